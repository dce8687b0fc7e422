"""Generation with padded batches of either side, and language-model calls without
deprecation warnings."""

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from helpers import IMAGE_ID, pad_batch, sample_ids, vlm
from mmloom import MultimodalProcessor
from mmloom.model.multimodal import left_pad


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_right_and_left_padded_batches_answer_like_one_by_one(tokenizer, pad_is_eos):
    # A right-padded batch (the processor's default) used to change the answers silently.
    model = vlm().eval()
    processor = MultimodalProcessor.from_model(
        model, tokenizer, {"vision": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})},
        template="vicuna_v1")
    pad_id = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    conversations = [[{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
                     [{"role": "user", "content": "Describe a red circle and a blue square on a white background."}],
                     [{"role": "user", "content": "<image>\nDescribe."}],
                     [{"role": "user", "content": "What shape is it? <image>"}]]
    images = [_image(0), None, _image(2), _image(3)]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=pad_id)

    def answers(batch):
        if pad_is_eos:  # re-pad the batch with the EOS id, as a pad = eos tokenizer does
            batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)
        extra = {"vision": batch["vision"]} if "vision" in batch else {}
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **extra, **settings)
        assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # the prompt as given
        return [row[batch["input_ids"].shape[1]:].tolist() for row in out]

    singles = [answers(processor(conversations=[c], images=[im], add_generation_prompt=True, return_labels=False))[0]
               for c, im in zip(conversations, images, strict=True)]
    for side in ("right", "left"):
        batch = processor(conversations=conversations, images=images, add_generation_prompt=True,
                          return_labels=False, padding_side=side)
        assert bool((batch["attention_mask"][:, -1 if side == "right" else 0] == 0).any())  # really padded
        assert answers(batch) == singles, side


def test_left_pad_moves_padding_first_and_keeps_token_order():
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], side="right")
    new_ids, new_mask = left_pad(ids, mask)
    assert new_ids.tolist() == [[5, 6, 7], [3, 3, 8], [3, 9, 10]]
    assert new_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    left_ids, left_mask = pad_batch([[5, 6, 7], [8]], side="left")
    assert left_pad(left_ids, left_mask)[0] is left_ids  # already left-padded: unchanged


def test_forward_and_generate_pass_only_what_the_language_model_takes(caplog):
    model = vlm().eval()
    ids = torch.tensor([sample_ids(16)])
    pixels = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model(input_ids=ids, pixel_values=pixels)
        model(input_ids=ids, labels=ids, pixel_values=pixels)
        model(input_ids=ids, labels=ids, pixel_values=pixels, compute_logits=False)
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        step = model(input_ids=torch.tensor([[20]]), past_key_values=_cache_of(out), use_cache=True,
                     attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long))
        model.generate(ids, pixel_values=pixels, max_new_tokens=2, do_sample=False, pad_token_id=3)
    notes = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [n for n in notes if "past_key_values" in n or "deprecated" in n.lower()], notes
    # The KV cache given as past_key_values reached the LLM: one step continues the prompt.
    full = model(input_ids=torch.cat([ids, torch.tensor([[20]])], dim=1), pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-4, rtol=1e-4)


def test_placeholder_rows_are_re_padded_with_their_features():
    # Placeholders move with their row: two right-padded rows with images of different lengths.
    model = vlm().eval()
    rows = [sample_ids(16, (30, 31, 32, 33, 34)), sample_ids(16, (40,))]
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad_batch(rows, side="right")
    batched = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                             pad_token_id=3)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), pixel_values=pixels[i : i + 1], max_new_tokens=4,
                               do_sample=False, pad_token_id=3)
        assert batched[i, ids.shape[1]:].tolist() == alone[0, len(row):].tolist()
    assert (ids == IMAGE_ID).sum() == 32


def _cache_of(output):
    """The KV cache of a model output: `cache` (transformers >= 5.2x) or `past_key_values` (5.21)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
