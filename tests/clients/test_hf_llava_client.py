"""transformers 4.x (a 4.4x release with LlavaForConditionalGeneration, its own environment) against mmloom:
`mmloom convert --to hf-llava` exports load with no missing or unexpected weights, the exported processor
(its chat template, LlavaProcessor and image processor) gives the ids and pixels of mmloom's own
preprocessing, and logits (within 1e-4, float32) and greedy tokens are equal; a left-padded batch generates
what each prompt generates alone. The "clip-square" model keeps the stock Llama-2 tokenizer without a pad
token: the export adds `<pad>` (as the official llava-hf conversion did).
"""

import pytest
import torch
from clients_support import (
    MAX_NEW_TOKENS,
    QUESTION,
    images,
    mmloom_side,
    only_in_client_stage,
    run_client,
    save_mmloom,
    stock_vicuna_folder,
    tiny_vicuna_composite,
)
from transformers import CLIPImageProcessor

from mmloom.cli.main import main
from mmloom.processing.image import ImageTransform

CASES = {  # name: (image processor saved with the mmloom model, the tokenizer's pad token)
    "transform-pad": (lambda: ImageTransform(32, pad_to_square=True), "<unk>"),
    "clip-square": (lambda: CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                    None),
}
ATOL = 1e-4
pytestmark = only_in_client_stage


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf4")
    tokenizer_dir = stock_vicuna_folder(root)
    pictures = images(root)
    ours, job_cases = {}, []
    for name, (processor, pad) in CASES.items():
        model, tokenizer = tiny_vicuna_composite(tokenizer_dir, "mlp2x_gelu")
        tokenizer.pad_token = pad
        folder = save_mmloom(model, tokenizer, processor(), root / f"mmloom-{name}")
        dst = root / f"hf-{name}"
        assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(folder), str(dst)]) == 0
        rows = mmloom_side(folder, pictures, vocab_limit=len(tokenizer))
        torch.save([(r["ids"], r["pixels"]) for r in rows], root / f"given-{name}.pt")
        ours[name] = rows
        job_cases.append({"name": name, "folder": str(dst), "images": [str(p) for p in pictures], "question": QUESTION,
                          "max_new_tokens": MAX_NEW_TOKENS, "given": str(root / f"given-{name}.pt")})
    return ours, run_client("hf4", "hf4_client.py", {"action": "exports", "cases": job_cases}, root)


@pytest.mark.parametrize("name", list(CASES))
def test_transformers4_loads_every_weight(exported, name):
    loading = exported[1][name]["loading"]
    assert loading["transformers"].startswith("4.")
    assert loading["missing"] == [] and loading["unexpected"] == [] and loading["mismatched"] == []
    assert loading["rope_theta"] == 500000.0 and loading["pad_token"] == (CASES[name][1] or "<pad>")
    assert loading["image_processor_class"] == ("LlavaImageProcessor" if name == "transform-pad" else "CLIPImageProcessor")


@pytest.mark.parametrize("name", list(CASES))
def test_same_logits_on_identical_inputs(exported, name):
    ours, results = exported
    for mine, logits in zip(ours[name], results[name]["given_logits"], strict=True):
        rows = min(logits.shape[-1], mine["logits"].shape[-1])
        assert float((mine["logits"][:, :rows] - logits[:, :rows]).abs().max()) < ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_processor_gives_mmloom_pixels(exported, name):
    ours, results = exported
    for mine, theirs in zip(ours[name], results[name]["rows"], strict=True):
        assert mine["pixels"].shape == theirs["pixels"].shape
        assert float((mine["pixels"] - theirs["pixels"]).abs().max()) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_processor_gives_mmloom_ids_logits_and_greedy_tokens(exported, name):
    ours, results = exported
    for mine, theirs in zip(ours[name], results[name]["rows"], strict=True):
        assert mine["ids"] == theirs["ids"]
        rows = min(theirs["logits"].shape[-1], mine["logits"].shape[-1])
        assert float((mine["logits"][:, :rows] - theirs["logits"][:, :rows]).abs().max()) < ATOL
        assert mine["generated"] == theirs["generated"]


@pytest.mark.parametrize("name", list(CASES))
def test_left_padded_batch_generates_as_one_by_one(exported, name):
    result = exported[1][name]
    assert result["batched"] == [row["generated"] for row in result["rows"]]
