"""Projector building: every ACT2CLS activation, widths from the LLM's input embeddings and
from what the encoder really outputs, user projections checked at composition, Cornstarch's
MultimodalProjectorConfig spelling."""

import pytest
import torch
from transformers.activations import ACT2CLS, ACT2FN

from helpers import IMAGE_ID, sample_ids
from mmloom import ModalEncoderModule, MultimodalModel, MultimodalProjector, MultimodalProjectorConfig
from mmloom.errors import MmloomError
from mmloom.model.projector import build_projection
from mmloom.testing import tiny_clip_vision, tiny_conv_encoder, tiny_llama, tiny_opt, tiny_whisper_encoder


@pytest.mark.parametrize("key", sorted(ACT2CLS))
def test_every_act2cls_key_builds_a_projector_equal_to_act2fn(key):
    # (class, kwargs) entries such as gelu_10 used to crash: 'tuple' object is not callable.
    torch.manual_seed(0)
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llama(),
                            init_projector_type="mlp", init_activation=key, placeholder_token_ids={"vision": IMAGE_ID})
    projection = model.vision_encoder.projector.projection
    assert len(projection) == 3 and type(projection[1]) is type(ACT2FN[key])
    x = torch.randn(2, 17, 32) * 8  # wide range: gelu_10 clips at +-10
    with torch.no_grad():
        want = projection[2](ACT2FN[key](projection[0](x)))
        torch.testing.assert_close(model.vision_encoder.projector(x), want, atol=1e-6, rtol=1e-5)
        out = model(input_ids=torch.tensor([sample_ids(17)]), labels=torch.tensor([sample_ids(17)]),
                    pixel_values=torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("key", sorted(k for k, v in ACT2CLS.items() if isinstance(v, tuple)))
def test_pair_activations_in_spelled_types_and_reloaded_configs(key, tmp_path):
    config = MultimodalProjectorConfig(in_features=8, out_features=6, projector_type=f"mlp3x_{key}")
    projector = MultimodalProjector(config)
    assert [type(m) for m in projector.projection[1::2]] == [type(ACT2FN[key])] * 2
    projector.save_pretrained(tmp_path)
    loaded = MultimodalProjector.from_pretrained(tmp_path)
    x = torch.randn(3, 8) * 20
    torch.testing.assert_close(loaded(x), projector(x))


def test_projector_width_is_the_llm_input_embedding_width():
    # OPT embeds tokens in word_embed_proj_dim (24), narrower than its hidden_size (48).
    llm = tiny_opt(hidden_size=48, word_embed_proj_dim=24)
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, llm, init_projector_type="mlp2x_gelu",
                            placeholder_token_ids={"vision": IMAGE_ID}).eval()
    assert model.llm_hidden_size == 24 and model.vision_encoder.projector.projection[-1].out_features == 24
    ids = torch.tensor([sample_ids(17)])
    out = model(input_ids=ids, labels=ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, ids.shape[1], 400) and torch.isfinite(out.loss)
    generated = model.generate(ids, pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=2, do_sample=False,
                               pad_token_id=3)
    assert generated.shape == (1, ids.shape[1] + 2)


def test_encoder_width_from_its_output_layer_when_the_config_cannot_tell():
    encoder = tiny_conv_encoder("tensor", hidden_size=20)
    del encoder.config.hidden_size  # a config that names no width: the last output layer (conv, 20) tells
    model = MultimodalModel({"vision": ModalEncoderModule(encoder)}, tiny_llama(),
                            placeholder_token_ids={"vision": IMAGE_ID}).eval()
    assert model.vision_encoder.projector.config.in_features == 20
    assert model.encode("vision", pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 16, 48)
    # Whisper names its width d_model.
    whisper = MultimodalModel({"audio": ModalEncoderModule(tiny_whisper_encoder(d_model=24))}, tiny_llama())
    assert whisper.audio_encoder.projector.config.in_features == 24


def test_user_projection_with_a_wrong_output_width_fails_at_composition():
    wrong = MultimodalProjector(MultimodalProjectorConfig(), projection=torch.nn.Linear(32, 64))
    with pytest.raises(MmloomError, match=r"vision projector outputs 64 features but the language model's input "
                                          r"embeddings are 48 wide"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=wrong)}, tiny_llama())
    wrong_in = MultimodalProjector(MultimodalProjectorConfig(), projection=torch.nn.Linear(40, 48))
    with pytest.raises(MmloomError, match="projection does not take 32-wide features"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=wrong_in)}, tiny_llama())
    opt_wrong = MultimodalProjector(MultimodalProjectorConfig(), projection=torch.nn.Linear(32, 48))
    with pytest.raises(MmloomError, match="outputs 48 features but the language model's input embeddings are 24"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=opt_wrong)}, tiny_opt())
    right = MultimodalProjector(MultimodalProjectorConfig(), projection=torch.nn.Linear(32, 48))
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=right)}, tiny_llama())
    assert (model.vision_encoder.projector.config.in_features, model.vision_encoder.projector.config.out_features) \
        == (32, 48)


def test_cornstarch_projector_config_is_accepted_with_the_same_meaning():
    clip, llm = tiny_clip_vision(), tiny_llama()
    config = MultimodalProjectorConfig(encoder_config=clip.config, text_config=llm.config, projection_type="mlp",
                                       activation="gelu_10")
    assert (config.in_features, config.out_features, config.projector_type) == (32, 48, "mlp")
    projector = MultimodalProjector(config)
    assert [type(m).__name__ for m in projector.projection] == ["Linear", type(ACT2FN["gelu_10"]).__name__, "Linear"]
    model = MultimodalModel({"vision": ModalEncoderModule(clip, projector=projector)}, llm,
                            init_projector_type="linear", placeholder_token_ids={"vision": IMAGE_ID})
    assert model.vision_encoder.projector.projection is projector.projection  # not replaced by init_projector_type
    # Whisper's config names its width d_model; OPT's embeddings are word_embed_proj_dim wide.
    audio = MultimodalProjectorConfig(encoder_config=tiny_whisper_encoder().config, text_config=tiny_opt().config)
    assert (audio.in_features, audio.out_features, audio.projector_type) == (32, 24, None)
    assert build_projection(audio)[0].out_features == 24  # unset type: linear
    # A lazily built projector keeps the type its config chose.
    lazy = MultimodalProjector(MultimodalProjectorConfig(projector_type="mlp", activation="relu"))
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=lazy)}, tiny_llama(),
                            init_projector_type="linear", init_activation="gelu")
    assert [type(m).__name__ for m in model.vision_encoder.projector.projection] == ["Linear", "ReLU", "Linear"]


def test_projector_config_rejects_unknown_arguments():
    with pytest.raises(MmloomError, match=r"unknown argument\(s\) \['projection_typ'\]"):
        MultimodalProjectorConfig(projection_typ="mlp")
    with pytest.raises(MmloomError, match="disagree"):
        MultimodalProjectorConfig(projector_type="linear", projection_type="mlp")
    with pytest.raises(MmloomError, match="unknown projector type 'qformer'"):
        MultimodalProjector(MultimodalProjectorConfig(in_features=4, out_features=4, projection_type="qformer"))
    # A saved config round-trips (PretrainedConfig's own keys are known).
    config = MultimodalProjectorConfig(in_features=4, out_features=6, projector_type="mlp2x_silu")
    assert MultimodalProjectorConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_features_of_another_width_than_the_projector_takes_are_a_clear_error():
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llama())
    with pytest.raises(MmloomError, match=r"projector takes 32-wide features but got features of shape \(1, 5, 20\)"):
        model.vision_encoder(module_features=torch.randn(1, 5, 20))


def test_lazy_projector_with_a_given_in_features_is_checked_against_the_encoder():
    lazy = MultimodalProjector(MultimodalProjectorConfig(in_features=40))
    with pytest.raises(MmloomError, match="vision projector takes 40 features but the vision encoder gives 32"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=lazy)}, tiny_llama())
    # An encoder whose width nothing tells works with a projector that says it.
    encoder = tiny_conv_encoder("tensor", hidden_size=20)
    del encoder.config.hidden_size
    encoder.conv = torch.nn.Identity()  # no output layer either
    told = MultimodalProjector(MultimodalProjectorConfig(in_features=3 * 8 * 8))
    with pytest.raises(MmloomError, match=r"cannot tell the width of TinyConvEncoder's features.*in_features=D"):
        MultimodalModel({"vision": ModalEncoderModule(encoder)}, tiny_llama())
    model = MultimodalModel({"vision": ModalEncoderModule(encoder, projector=told)}, tiny_llama())
    assert model.vision_encoder.projector.projection[0].in_features == 192
