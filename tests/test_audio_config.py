"""`model.encoders` in training configs: audio and vision encoders by name next to the seed's
`image_model` keys, freeze regexes and LoRA parts addressing each encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmloom.errors import MmloomError
from mmloom.model.adapters import add_lora
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.training.builder import build_model
from mmloom.training.config import LoraSettings, parse_train_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def config(name: str, **model) -> dict:
    data = yaml.safe_load((TINY / name).read_text())
    data["model"].update(model)
    return data


def test_audio_vision_composite_from_config():
    cfg = parse_train_config(config("audio_vision.yaml"))
    model = build_model(cfg)
    assert model.encoder_names == ["vision", "audio"]
    assert model.placeholder_token_ids == {"vision": 4, "audio": 5}
    assert isinstance(model.vision_encoder.postprocess_module_callback, FeatureSelect)
    pool = model.audio_encoder.postprocess_module_callback
    assert isinstance(pool, AudioPool) and (pool.stride, pool.mode, pool.downsample) == (2, "mean", 2)
    assert type(model.audio_encoder.module).__name__ == "WhisperEncoder"
    # the seed's freeze names and the encoders' own names
    model.freeze(["^image_model", "^audio_model"])
    frozen = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_encoder.module", "audio_encoder.module"}


def test_default_placeholder_ids_and_per_encoder_projectors():
    data = config("audio_vision.yaml")
    data["model"]["image_token_id"] = None
    data["model"]["encoders"]["audio"].update(token_id=None, projector="linear")
    model = build_model(parse_train_config(data))
    # the ids `mmloom data build` gives <image> and <audio> in a tokenizer that has neither
    assert model.placeholder_token_ids == {"vision": 400, "audio": 401}
    assert model.audio_encoder.projector.config.projector_type == "linear"
    assert model.vision_encoder.projector.config.projector_type == "mlp2x_gelu"


def test_encoder_config_errors():
    vision = yaml.safe_load((TINY / "phase1.yaml").read_text())["model"]["image_model"]
    with pytest.raises(MmloomError, match="both define the vision encoder"):
        parse_train_config(config("audio_vision.yaml", encoders={"vision": {"model": vision}}))
    with pytest.raises(MmloomError, match="model_type"):
        parse_train_config(config("audio.yaml", encoders={"audio": {"model": {"num_mel_bins": 16}}}))
    bad = config("audio.yaml")
    bad["model"]["encoders"] = {"vision": {"model": vision, "pooling": {"stride": 2}}}
    with pytest.raises(MmloomError, match="audio encoders only"):
        build_model(parse_train_config(bad))


def test_lora_parts_address_encoders_by_name():
    model = build_model(parse_train_config(config("audio.yaml")))
    add_lora(model, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"], parts=["text_model", "audio"]))
    assert hasattr(model.language_model, "peft_config") and hasattr(model.audio_encoder.module, "peft_config")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "projector" in name for name in trainable)
    assert any(name.startswith("audio_encoder.module") for name in trainable)
    with pytest.raises(MmloomError, match="unknown part"):
        add_lora(model, LoraSettings(parts=["vision"]))
