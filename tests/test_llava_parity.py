"""mmloom and transformers' LlavaForConditionalGeneration with the same weights agree exactly."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from helpers import IMAGE_ID, pad_batch, sample_ids, vlm


def llava_from(model) -> LlavaForConditionalGeneration:
    """A transformers Llava holding the weights of an mmloom CLIP + Llama + mlp2x_gelu composite."""
    clip = model.vision_encoder.module
    llm = model.language_model
    config = LlavaConfig(
        vision_config=clip.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(clip.state_dict())
    proj = model.vision_encoder.projector.projection
    hf.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    hf.model.language_model.load_state_dict(llm.model.state_dict())
    hf.lm_head.load_state_dict(llm.lm_head.state_dict())
    return hf


def test_logits_loss_and_greedy_generation_match_transformers():
    model = vlm().eval()
    hf = llava_from(model)
    ids, mask = pad_batch([sample_ids(16, (30, 31, 32, 33, 34)), sample_ids(16, (40, 41))], side="left")
    # transformers supervises whatever labels it gets; mmloom always ignores placeholder positions.
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_ID), -100)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    with torch.no_grad():  # unmasked labels give the same loss: mmloom masks placeholders itself
        raw = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), pixel_values=pixels)
    torch.testing.assert_close(raw.loss, theirs.loss, atol=1e-5, rtol=0)

    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=3)
    generated = model.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert torch.equal(generated, expected)
