"""Half precision in every dtype layout with float32 encoder inputs (what feature extractors
and image processors return)."""

import pytest
import torch

from helpers import AUDIO_ID, IMAGE_ID, audio_vlm

LAYOUTS = {
    "whole model": lambda m, dtype: m.to(dtype),
    "language model only": lambda m, dtype: m.language_model.to(dtype),
    "encoders only": lambda m, dtype: [e.module.to(dtype) for e in m.encoders.values()],
    "projectors only": lambda m, dtype: [e.projector.to(dtype) for e in m.encoders.values()],
}


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0, *[IMAGE_ID] * 16, 30, *[AUDIO_ID] * 8, 31, 32],
                        [0, 40, *[AUDIO_ID] * 8, *[IMAGE_ID] * 16, 41, 42]])
    # Both float32, as CLIPImageProcessor / WhisperFeatureExtractor give them.
    return ids, torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 16, 16, generator=gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_inputs_run_in_every_half_precision_layout(layout, dtype):
    # Whisper used to crash: "Input type (float) and bias type (BFloat16) should be the same".
    ids, pixels, features = batch()
    with torch.no_grad():
        reference = audio_vlm().eval()(input_ids=ids, pixel_values=pixels, input_features=features).logits
        model = audio_vlm().eval()
        LAYOUTS[layout](model, dtype)
        logits = model(input_ids=ids, pixel_values=pixels, input_features=features).logits
        generated = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), pixel_values=pixels[:1],
                                   input_features=features[:1], max_new_tokens=3, do_sample=False, pad_token_id=3)
    assert logits.dtype == model.language_model.dtype
    assert float((logits.float() - reference).abs().max()) < 0.1
    assert generated.shape == (1, ids.shape[1] + 3)


def test_projected_features_take_the_embedding_dtype_and_training_backward_runs():
    ids, pixels, features = batch()
    model = audio_vlm()
    model.audio_encoder.module.to(torch.bfloat16)
    model.language_model.to(torch.float16)
    model.train(encoders_mode={"vision": (False, True), "audio": (False, True)}, llm_mode=False)
    embeds = model.embed_inputs(ids, {"vision": {"pixel_values": pixels}, "audio": {"input_features": features}})
    assert embeds.dtype == torch.float16
    loss = model(input_ids=ids, labels=ids, pixel_values=pixels, input_features=features).loss
    loss.backward()
    assert model.audio_encoder.projector.projection[0].weight.grad is not None
    assert model.audio_encoder.projector.projection[0].weight.grad.dtype == torch.float32
