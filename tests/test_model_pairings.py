"""Every encoder kind with every LLM family: forward, backward, gradients only where trainable."""

import pytest
import torch

from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.testing import tiny_clip_vision, tiny_llm, tiny_siglip_vision, tiny_whisper_encoder

ENCODERS = {
    # name: (builder, callback, input name, input tensor shape)
    "clip": (tiny_clip_vision, FeatureSelect(-2, "patch"), "pixel_values", (2, 3, 32, 32)),
    "siglip": (tiny_siglip_vision, FeatureSelect(-1, "full"), "pixel_values", (2, 3, 32, 32)),
    "whisper": (tiny_whisper_encoder, None, "input_features", (2, 16, 16)),
}
LLMS = ["llama", "qwen2", "mistral", "gemma"]
PLACEHOLDER = 4


@pytest.mark.parametrize("llm_kind", LLMS)
@pytest.mark.parametrize("encoder_kind", list(ENCODERS))
def test_forward_backward_gradients_reach_only_trainable(encoder_kind, llm_kind):
    build, callback, input_name, shape = ENCODERS[encoder_kind]
    model = MultimodalModel(
        {"enc": ModalEncoderModule(build(), postprocess_module_callback=callback)},
        tiny_llm(llm_kind),
        init_projector_type="mlp",
        init_activation="silu",
        placeholder_token_ids={"enc": PLACEHOLDER},
    )
    n = model.num_feature_tokens("enc")
    ids = torch.tensor([[0, *[PLACEHOLDER] * n, 20, 21, 22, 1]] * 2)
    # Phase-2 style: encoder frozen, projector and LLM train.
    model.train(encoders_mode={"enc": (False, True)}, llm_mode=True)
    out = model(input_ids=ids, labels=ids, enc={input_name: torch.randn(shape)})
    assert out.logits.shape == (2, ids.shape[1], model.language_model.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("enc_encoder.module"):
            assert param.grad is None, name
        else:
            assert param.grad is not None, name
    assert model.enc_encoder.projector.projection[0].weight.grad.abs().sum() > 0
    assert not model.enc_encoder.module.training and model.language_model.training
