"""The llama.cpp client tests' side: tiny composites in the shapes llama.cpp can hold (SigLIP / CLIP towers,
mlp2x_gelu projectors, Llama / Qwen2 language models whose widths are multiples of 32 so that q8_0 applies),
tokenizers of the families llama.cpp recognises, mmloom's own answers (prompt ids, greedy tokens, top
log-probabilities) and the runner of the `llamacpp` client environment (JSON in and out: it has no torch)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from clients_support import HERE, client_python
from PIL import Image

from mmloom.testing import SAMPLE_TEXTS

QUESTION = "What is in the picture?"
TEXT_QUESTION = "Tell me a story about two triangles and a circle."
IMAGE_SIZE, PATCH = 32, 8
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = SAMPLE_TEXTS + [
    "an astronaut posing in a white space suit",
    "What is shown in this picture? The astronaut is holding a helmet.",
    "Tell me a story about two triangles and a circle.",
    "Numbers 12345 and 2024, café, naïve, ünïcödé; émoji-free text\n\n  indented   spaces\ttab",
]


def byte_level_tokenizer(folder: Path, family: str):
    """A byte-level BPE tokenizer with the pre-tokenizer of `family` ("qwen2": the Qwen2 split regex and an
    NFC normalizer, eos <|im_end|>, pad <|endoftext|>, no BOS; "llama3": the Llama-3 regex with
    ignore_merges, BOS <|begin_of_text|>; "gpt2": ByteLevel's own regex), trained on sample texts."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"],
                "gpt2": ["<s>", "</s>", "<pad>"]}[family]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    if family == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = QWEN2_REGEX if family == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    kwargs = {"qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
              "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
              "gpt2": dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")}[family]
    if "bos_token" in kwargs and family == "gpt2":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs,
                                 additional_special_tokens=[t for t in specials if t not in kwargs.values()])
    hf.save_pretrained(folder)
    return folder


def composite(tokenizer_dir: Path, llm: str = "llama", tower: str = "siglip", seed: int = 0, projector="mlp2x_gelu",
              layer: int | list[int] = -2, **llm_config):
    """(model, tokenizer): a 3-layer SigLIP ("full": every position) or CLIP ("patch": CLS dropped) tower at
    32 px / patch 8 (16 image tokens), features from hidden layer(s) `layer`, a 2-layer Llama, Mistral or
    Qwen2 of width 64 with tied embeddings and rope_theta 500000 (`llm_config` overrides), <image> added
    and the vocabulary padded to a multiple of 64; weights perturbed away from their init so that every
    part changes the logits."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
    from mmloom.interop.tokens import prepare_tokenizer_and_vocab

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4)
    if tower == "siglip":
        encoder = SiglipVisionModel(SiglipVisionConfig(**vision))
        select = FeatureSelect(layer, "full")
    else:
        encoder = CLIPVisionModel(CLIPVisionConfig(**vision, projection_dim=64))
        select = FeatureSelect(layer, "patch")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[llm]
    lm = model_cls(config_cls(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        **llm_config}))
    ids = prepare_tokenizer_and_vocab(tokenizer, lm, ["<image>"], pad_to_multiple_of=64)
    model = MultimodalModel({"vision": ModalEncoderModule(encoder, postprocess_module_callback=select)}, lm,
                            init_projector_type=projector, placeholder_token_ids={"vision": ids["<image>"]})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), tokenizer


def save_mmloom(model, tokenizer, template: str, folder: Path, tower: str = "siglip", pad: bool = False) -> Path:
    """The composite as an mmloom folder, its processor the tower's own preprocessing at 32 px (SigLIP:
    mean / std 0.5; CLIP: CLIP's); `pad`: LLaVA-1.5's (pad to a square with the CLIP mean colour, which is
    llama.cpp's letterbox colour (122, 116, 104), then CLIP's steps)."""
    from mmloom.interop.common import Bundle, write_mmloom
    from mmloom.processing.image import ImageTransform

    if pad:
        transform = ImageTransform(IMAGE_SIZE, pad_to_square=True)
    elif tower == "siglip":
        transform = ImageTransform(IMAGE_SIZE, mean=[0.5] * 3, std=[0.5] * 3)
    else:
        transform = ImageTransform(IMAGE_SIZE)
    write_mmloom(Bundle(model, tokenizer, {"vision": transform}, template), folder)
    return folder


def square_image(root: Path, size: int = IMAGE_SIZE) -> Path:
    """A square picture at the tower's native size (no resampling differs between the two stacks)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    arr = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) * 127 // size], -1)
    arr = (arr + rng.integers(0, 60, (size, size, 3))).clip(0, 255).astype(np.uint8)
    arr[size // 4: size // 2, size // 4: size // 2] = (220, 30, 30)
    path = root / f"square-{size}.png"
    Image.fromarray(arr).save(path)
    return path


def prompts(image: Path) -> list[dict]:
    """The two prompts of every case: a text-only question and a question about `image`."""
    return [{"question": TEXT_QUESTION, "image": None}, {"question": QUESTION, "image": str(image)}]


def mmloom_side(folder: Path, cases: list[dict], n_predict: int, rows_used: int,
                emulate_clip_cls_last: bool = False) -> list[dict]:
    """mmloom's own processing of each prompt: the prompt text (the template's rendering, `<image>` where the
    image goes), ids, greedy tokens (never the padded rows >= `rows_used`) and the log-probabilities (over
    every row) at each generated position. `emulate_clip_cls_last`: the CLIP tower
    gets its CLS embedding after the patches, with positions 0..n in that order, as llama.cpp's current
    LLaVA graph computes it (llama.cpp issue 25814)."""
    from mmloom import MultimodalModel, MultimodalProcessor
    from mmloom.processing.image import load_image

    model = MultimodalModel.from_pretrained(folder).eval()
    processor = MultimodalProcessor.from_pretrained(folder)
    if emulate_clip_cls_last:
        embeddings = model.vision_encoder.module.embeddings

        def cls_last(pixel_values, interpolate_pos_encoding=False):
            weight = embeddings.patch_embedding.weight
            patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
            cls = embeddings.class_embedding.expand(pixel_values.shape[0], 1, -1)
            return torch.cat([patches, cls], 1) + embeddings.position_embedding(embeddings.position_ids)

        embeddings.forward = cls_last
    out = []
    for case in cases:
        content = ("<image>\n" if case["image"] else "") + case["question"]
        messages = [{"role": "user", "content": content}]
        text = processor.template.render(messages, add_generation_prompt=True)
        record = {"conversations": [{"from": "human", "value": content}]}
        kwargs = {"images": [load_image(case["image"])]} if case["image"] else {}
        batch = processor(conversations=[record], add_generation_prompt=True, return_labels=False, **kwargs)
        ids = batch["input_ids"]
        extra = {"pixel_values": batch["vision"]["pixel_values"]} if case["image"] else {}
        generated, logprobs = [], []
        with torch.no_grad():
            for _ in range(n_predict):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].float()
                logprobs.append(torch.log_softmax(logits, -1))
                logits[rows_used:] = -float("inf")
                token = int(logits.argmax())
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        out.append({"text": text, "image": case["image"], "ids": batch["input_ids"][0].tolist(), "generated": generated, "top_logprobs": logprobs})
    return out


def run_llamacpp(job: dict, root: Path, timeout: int = 600) -> dict:
    """Run llamacpp_client.py in the `llamacpp` client environment on `job`; its JSON results."""
    python = client_python("llamacpp")
    job = {**job, "out": str(root / "llamacpp-results.json")}
    job_path = root / "llamacpp-job.json"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(python), str(HERE / "llamacpp_client.py"), str(job_path)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(root))
    if proc.returncode != 0:
        raise AssertionError(f"llamacpp_client.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(job["out"]).read_text())


def report(request, lines: list[str]) -> None:
    """Print `lines` into the test log, also when the tests pass (CI's log keeps the measured figures)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    write = request.config.pluginmanager.getplugin("terminalreporter").write_line
    with capture.global_and_fixture_disabled():
        for line in lines:
            write(line)
