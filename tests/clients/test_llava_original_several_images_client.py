"""The original LLaVA code (llava-torch 1.2.2.post1 on transformers 4.37.2, the `llava` client environment)
on the `llava` export of a composite, with one prompt holding 2 images (`<image>` in human turns 1 and 2
of a vicuna_v1 conversation): its own `prepare_inputs_labels_for_multimodal` path (images stacked by
`process_images` into one (2, 3, H, W) tensor, one -200 per image from `tokenizer_image_token`) puts the
images' features in order and gives mmloom's ids, pixels, logits (within 1e-4, as the single-image
client tests) and greedy tokens. The model: the real Llama-2 tokenizer, a tiny CLIP + Llama, mlp2x_gelu,
`image_aspect_ratio: pad`, a wide and a tall picture.
"""

import pytest
import torch
from clients_support import (
    IMAGE_SPAN,
    MAX_NEW_TOKENS,
    collapse_image_span,
    expand_image_marker,
    images,
    only_in_client_stage,
    run_client,
    save_mmloom,
    stock_vicuna_folder,
    tiny_vicuna_composite,
)

from mmloom.cli.main import main
from mmloom.processing.image import ImageTransform, load_image

ATOL = 1e-4
TURNS = [("human", "<image>\nWhat is in the first picture?"), ("gpt", "A red square."),
         ("human", "<image>\nAnd in the second one?")]
pytestmark = only_in_client_stage


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from mmloom import MultimodalModel, MultimodalProcessor

    root = tmp_path_factory.mktemp("llava-several")
    pictures = images(root)[1:]  # wide 48x24, tall 30x52
    model, tokenizer = tiny_vicuna_composite(stock_vicuna_folder(root), "mlp2x_gelu")
    folder = save_mmloom(model, tokenizer, ImageTransform(32, pad_to_square=True), root / "mmloom")
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(folder), str(root / "export")]) == 0
    model = MultimodalModel.from_pretrained(folder).eval()
    processor = MultimodalProcessor.from_pretrained(folder)
    image_id = model.placeholder_token_ids["vision"]
    record = {"conversations": [{"from": f, "value": v} for f, v in TURNS]}
    batch = processor(conversations=[record], images=[[load_image(p) for p in pictures]], add_generation_prompt=True,
                      return_labels=False)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["vision"]["pixel_values"]
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[0]
        generated = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=MAX_NEW_TOKENS,
                                   min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                   suppress_tokens=list(range(len(tokenizer), rows)) or None,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    new = generated[0, ids.shape[1]:] if generated.shape[1] > MAX_NEW_TOKENS else generated[0]
    ours = {"ids": ids[0].tolist(), "pixels": pixels, "logits": logits, "generated": new.tolist(),
            "image_id": image_id, "vocab": len(tokenizer)}
    torch.save((collapse_image_span(ours["ids"], image_id), pixels), root / "given.pt")
    job = {"action": "several", "text_folder": str(root / "export" / "text_model_llava"),
           "images": [str(p) for p in pictures], "turns": TURNS, "max_new_tokens": MAX_NEW_TOKENS,
           "given": str(root / "given.pt")}
    return ours, run_client("llava", "llava_client.py", job, root)


def test_original_code_places_each_image_at_its_marker(compared):
    """prepare_inputs_labels_for_multimodal replaces the first -200 by the first image's features and the
    second by the second's: several images in one prompt are the original code's own path."""
    theirs = compared[1]
    assert theirs["loading"]["image_aspect_ratio"] == "pad"
    assert len(theirs["markers"]) == 2 and theirs["features"].shape[:2] == (2, IMAGE_SPAN)
    for k, marker in enumerate(theirs["markers"]):
        start = marker + k * (IMAGE_SPAN - 1)
        torch.testing.assert_close(theirs["embeds"][start:start + IMAGE_SPAN], theirs["features"][k])
    assert not torch.allclose(theirs["features"][0], theirs["features"][1], atol=1e-3)


def test_same_ids_and_pixels(compared):
    ours, theirs = compared
    assert ours["ids"] == expand_image_marker(theirs["ids"], ours["image_id"])
    assert theirs["pixels"].shape == ours["pixels"].shape == (2, 3, 32, 32)
    assert float((theirs["pixels"] - ours["pixels"]).abs().max()) < 1e-5


def test_same_logits_and_greedy_tokens(compared):
    ours, theirs = compared
    vocab = ours["vocab"]
    for key in ("logits", "list_logits", "given_logits"):  # stacked images, a list of images, mmloom's inputs
        assert theirs[key].shape == (len(ours["ids"]), vocab), key
        assert float((ours["logits"][:, :vocab] - theirs[key]).abs().max()) < ATOL, key
    assert theirs["generated"] == ours["generated"] == theirs["given_generated"]
