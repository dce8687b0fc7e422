"""Several images per prompt through the `hf-llava` export in transformers 4.49 (the `hf4` client
environment): for 2 images in human turns 1 and 2 and for 3 images (two in turn 1, one in turn 3), the
exported `AutoProcessor` (LlavaProcessor + the exported vicuna_v1 chat template) gives mmloom's ids and
pixels, and `LlavaForConditionalGeneration` gives mmloom's logits (within 1e-4, float32) and greedy tokens.
The model: the real Llama-2 tokenizer, a tiny CLIP + Llama, mlp2x_gelu, padded square images of three shapes.
"""

import pytest
import torch
from clients_support import (
    images,
    only_in_client_stage,
    run_client,
    save_mmloom,
    stock_vicuna_folder,
    tiny_vicuna_composite,
)

from helpers import SEVERAL_IMAGE_CHATS
from mmloom.cli.main import main
from mmloom.processing.image import ImageTransform, load_image

ATOL = 1e-4
MAX_NEW_TOKENS = 6
pytestmark = only_in_client_stage
# name: (transformers' chat messages, mmloom's LLaVA record turns, which of the pictures, in order)
PICTURES = {"two images, turns 1 and 2": [1, 2], "three images, two in turn 1, one in turn 3": [2, 0, 1]}
CASES = {name: (messages, turns, PICTURES[name]) for name, (messages, turns) in SEVERAL_IMAGE_CHATS.items()}


def mmloom_rows(folder, pictures, vocab_limit):
    """mmloom's own preprocessing of each case: ids, pixels (one row per image), logits, greedy tokens."""
    from mmloom import MultimodalModel, MultimodalProcessor

    model = MultimodalModel.from_pretrained(folder).eval()
    processor = MultimodalProcessor.from_pretrained(folder)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    out = {}
    for name, (_, turns, which) in CASES.items():
        record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
        batch = processor(conversations=[record], images=[[load_image(pictures[k]) for k in which]],
                          add_generation_prompt=True, return_labels=False)
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["vision"]["pixel_values"]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[0]
            generated = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=MAX_NEW_TOKENS,
                                       min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       suppress_tokens=list(range(vocab_limit, rows)) or None,
                                       pad_token_id=processor.tokenizer.pad_token_id)
        new = generated[0, ids.shape[1]:] if generated.shape[1] > MAX_NEW_TOKENS else generated[0]
        out[name] = {"ids": ids[0].tolist(), "pixels": pixels, "logits": logits, "generated": new.tolist(),
                     "image_slots": int((ids == model.placeholder_token_ids["vision"]).sum()),
                     "per_image": model.num_feature_tokens("vision")}
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf4-several")
    pictures = images(root)  # square 32x32, wide 48x24, tall 30x52
    model, tokenizer = tiny_vicuna_composite(stock_vicuna_folder(root), "mlp2x_gelu")
    tokenizer.pad_token = "<unk>"
    folder = root / "mmloom"
    save_mmloom(model, tokenizer, ImageTransform(32, pad_to_square=True), folder)
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(folder), str(root / "hf")]) == 0
    ours = mmloom_rows(folder, pictures, vocab_limit=len(tokenizer))
    job_cases = []
    for k, (name, (messages, _, which)) in enumerate(CASES.items()):
        given = root / f"given-{k}.pt"
        torch.save((ours[name]["ids"], ours[name]["pixels"]), given)
        job_cases.append({"name": name, "messages": messages, "images": [str(pictures[i]) for i in which],
                          "given": str(given)})
    job = {"action": "several", "folder": str(root / "hf"), "max_new_tokens": MAX_NEW_TOKENS, "cases": job_cases}
    return ours, run_client("hf4", "hf4_client.py", job, root)


def test_runs_in_transformers_4_49(compared):
    assert compared[1]["transformers"] == "4.49.0"


@pytest.mark.parametrize("name", list(CASES))
def test_processor_gives_mmloom_ids_and_pixels(compared, name):
    ours, theirs = compared[0][name], compared[1][name]
    assert ours["image_slots"] == len(CASES[name][2]) * ours["per_image"]
    assert theirs["ids"] == ours["ids"]
    assert theirs["pixels"].shape == ours["pixels"].shape == (len(CASES[name][2]), 3, 32, 32)
    assert float((theirs["pixels"] - ours["pixels"]).abs().max()) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_same_logits_and_greedy_tokens(compared, name):
    ours, theirs = compared[0][name], compared[1][name]
    vocab = theirs["logits"].shape[-1]
    assert theirs["logits"].shape[0] == ours["logits"].shape[0]
    assert float((ours["logits"][:, :vocab] - theirs["logits"]).abs().max()) < ATOL
    assert float((ours["logits"][:, :vocab] - theirs["given_logits"]).abs().max()) < ATOL
    assert theirs["generated"] == ours["generated"]


@pytest.mark.parametrize("name", list(CASES))
def test_every_image_matters(compared, name):
    """Another last image (zeros) changes transformers' logits: every image reaches the LLM."""
    theirs = compared[1][name]
    assert float((theirs["changed_logits"] - theirs["given_logits"]).abs().max()) > 1e-3
