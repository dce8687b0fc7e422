"""Several images per prompt through the `hf-llava` export, against transformers itself:
`AutoProcessor` (LlavaProcessor + the exported chat template) gives mmloom's ids and pixels, and
`LlavaForConditionalGeneration` gives mmloom's logits (within 1e-4) and greedy tokens, for 2 images
in human turns 1 and 2 and for 3 images (two in turn 1, one in turn 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from helpers import SEVERAL_IMAGE_CHATS, sp_vlm
from mmloom import MultimodalProcessor
from mmloom.cli.main import main
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.model.batch import model_inputs
from mmloom.processing.image import ImageTransform

# (transformers' chat messages, mmloom's LLaVA record turns, number of images)
CASES = {name: (messages, turns, sum(t.count("<image>") for _, t in turns))
         for name, (messages, turns) in SEVERAL_IMAGE_CHATS.items()}


def noise_image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("interleaved_export")
    torch.manual_seed(0)
    model, tokenizer = sp_vlm(root / "tok", initializer_range=0.1)
    write_mmloom(Bundle(model, tokenizer, {"vision": ImageTransform(32, pad_to_square=True)}), root / "mm")
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(root / "mm"), str(root / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
    return model, MultimodalProcessor.from_pretrained(root / "mm"), hf, AutoProcessor.from_pretrained(root / "hf")


@pytest.mark.parametrize("case", list(CASES))
def test_hf_llava_several_images_per_prompt(exported, case):
    model, ours, hf, theirs = exported
    messages, turns, n = CASES[case]
    images = [noise_image(24 + 8 * k, 48 - 8 * k, seed=k) for k in range(n)]
    prompt = theirs.apply_chat_template(messages, add_generation_prompt=True)
    hf_batch = theirs(text=prompt, images=images, return_tensors="pt")
    record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    mine = ours(conversations=[record], images=[images], add_generation_prompt=True, return_labels=False)
    assert hf_batch["input_ids"][0].tolist() == mine["input_ids"][0].tolist()
    image_id = model.placeholder_token_ids["vision"]
    assert int((mine["input_ids"] == image_id).sum()) == n * model.num_feature_tokens("vision")
    assert mine["vision"]["pixel_values"].shape[0] == n
    assert float((hf_batch["pixel_values"] - mine["vision"]["pixel_values"]).abs().max()) < 1e-5
    inputs = model_inputs(mine)
    with torch.no_grad():
        theirs_logits = hf(**hf_batch).logits
        our_logits = model(**inputs).logits
        torch.testing.assert_close(our_logits, theirs_logits, atol=1e-4, rtol=0)
        greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        hf_tokens = hf.generate(**hf_batch, **greedy)[0, hf_batch["input_ids"].shape[1]:].tolist()
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        our_tokens = model.generate(ids, attention_mask=mask, **inputs, **greedy)[0, ids.shape[1]:].tolist()
    assert our_tokens == hf_tokens and len(set(our_tokens)) > 1
    # every image matters: another last image changes transformers' and mmloom's logits alike
    other = [*images[:-1], noise_image(32, 32, seed=99)]
    with torch.no_grad():
        changed = hf(**theirs(text=prompt, images=other, return_tensors="pt")).logits
    assert not torch.allclose(changed, theirs_logits, atol=1e-4)
