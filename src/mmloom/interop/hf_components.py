"""Separate HF folders (a vision tower, optionally an audio encoder, and a causal LM) -> a new
composite with fresh projectors, ready for phase 1 (projector alignment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError
from mmloom.interop.common import (
    Bundle,
    check_dir,
    default_image_processor,
    hf_dtype,
    load_image_processor,
    load_tokenizer,
)
from mmloom.interop.tokens import prepare_tokenizer_and_vocab
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.multimodal import MultimodalModel

VISION_TYPES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def load_vision_tower(path: str | Path, dtype=None):
    """A vision tower from a HF folder; a full CLIP/SigLIP folder gives its vision part."""
    import transformers
    from transformers import AutoConfig

    path = check_dir(path, "--image-model")
    config = AutoConfig.from_pretrained(path)
    class_name = VISION_TYPES.get(config.model_type)
    if class_name is None:
        if hasattr(config, "vision_config") or hasattr(config, "text_config"):
            raise MmloomError(
                f"{path} is a {config.model_type!r} model with several parts; give a vision-only folder "
                "(CLIP, SigLIP or any AutoModel vision encoder)"
            )
        class_name = "AutoModel"
    return getattr(transformers, class_name).from_pretrained(path, dtype=hf_dtype(dtype))


def load_audio_encoder(path: str | Path, dtype=None):
    """The encoder of a Whisper folder (and its feature extractor, when the folder has one)."""
    from transformers import AutoConfig, AutoFeatureExtractor, WhisperFeatureExtractor, WhisperModel

    path = check_dir(path, "--audio-model")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "whisper":
        raise MmloomError(f"--audio-model: only Whisper folders are supported, {path} is {config.model_type!r}")
    encoder = WhisperModel.from_pretrained(path, dtype=hf_dtype(dtype)).get_encoder()
    if (path / "preprocessor_config.json").exists():
        extractor = AutoFeatureExtractor.from_pretrained(path)
    else:
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return encoder.eval(), extractor


def load_language_model(path: str | Path, dtype=None):
    from transformers import AutoModelForCausalLM

    path = check_dir(path, "--text-model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=hf_dtype(dtype)).eval()


def read_hf_components(
    src: str | Path | None = None,
    image_model: str | Path | None = None,
    text_model: str | Path | None = None,
    audio_model: str | Path | None = None,
    projector: str = "mlp2x_gelu",
    activation: str = "gelu",
    feature_layer: int | list[int] = -2,
    feature_strategy: str = "patch",
    pad_to_multiple_of: int | None = None,
    template: str | None = None,
    dtype: str | None = None,
    audio_stride: int = 1,
    audio_pool_mode: str = "mean",
    **_: Any,
) -> Bundle:
    """Compose a new model: fresh projector(s), `<image>` (and `<audio>`) added to the tokenizer,
    embeddings resized to cover it (rounded up to `pad_to_multiple_of`). The audio encoder keeps
    each clip's real-length positions, pooled by `audio_stride` (`AudioPool`)."""
    if src is not None:
        raise MmloomError("hf-components takes no SRC: give --image-model DIR --text-model DIR")
    if text_model is None or (image_model is None and audio_model is None):
        raise MmloomError("hf-components needs --text-model DIR and --image-model DIR (and/or --audio-model DIR)")
    llm = load_language_model(text_model, dtype)
    tokenizer = load_tokenizer(Path(text_model), required=True)
    encoders, processors, placeholders = {}, {}, {}
    if image_model is not None:
        tower = load_vision_tower(image_model, dtype).eval()
        select = FeatureSelect(feature_layer, feature_strategy)
        encoders["vision"] = ModalEncoderModule(tower, postprocess_module_callback=select)
        processors["vision"] = load_image_processor(Path(image_model)) or default_image_processor(tower.config)
        placeholders["vision"] = "<image>"
    if audio_model is not None:
        whisper, extractor = load_audio_encoder(audio_model, dtype)
        encoders["audio"] = ModalEncoderModule(
            whisper, postprocess_module_callback=AudioPool(audio_stride or 1, audio_pool_mode))
        processors["audio"] = extractor
        placeholders["audio"] = "<audio>"
    ids = prepare_tokenizer_and_vocab(tokenizer, llm, list(placeholders.values()), pad_to_multiple_of)
    model = MultimodalModel(
        encoders,
        llm,
        init_projector_type=projector,
        init_activation=activation,
        placeholder_token_ids={name: ids[token] for name, token in placeholders.items()},
    )
    model.to(llm.dtype)  # fresh projectors in the checkpoint's dtype
    notes = [f"new projector(s): {projector}; placeholder ids {model.placeholder_token_ids}; "
             f"vocabulary {llm.get_input_embeddings().weight.shape[0]} rows"]
    return Bundle(model.eval(), tokenizer, processors, template or "vicuna_v1", notes=notes)
