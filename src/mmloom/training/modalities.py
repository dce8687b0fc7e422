"""The trainer's handling of modalities beyond the seed's one vision encoder: which encoders a
model has, the audio clips of the data (reader, checks against the model, collator), and what the
processor saved with a trained model needs for each modality.

The trainer (`training.loop`) calls these; everything here is modality-generic or audio-specific,
so the vision path of the seed stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmloom.data.audio_items import AudioClipReader
from mmloom.data.h5_format import read_data_params
from mmloom.data.modal_collate import AudioCollator
from mmloom.errors import MmloomError
from mmloom.model.adapters import base_module
from mmloom.model.feature_count import encoder_positions, token_count_spec


def vision_geometry(model) -> tuple[int, int, int]:
    """(feature tokens per image, image side in pixels, encoder positions per image) of the
    model's vision encoder; (0, 0, 0) for a model without one (e.g. an audio-LLM)."""
    if "vision" not in model.encoder_names:
        return 0, 0, 0
    tokens = model.num_feature_tokens("vision")
    config = model.encoders["vision"].config
    image_size = int(getattr(config, "image_size", 0) or 0)
    try:  # the encoder's sequence length (a CLS token only where the model has one)
        positions = encoder_positions(config)
    except MmloomError:
        positions = tokens
    return tokens, image_size, positions


def data_audio_params(data_dir: str | Path) -> dict[str, Any] | None:
    """`modalities.audio` of a data folder's data_params.json (None: the data has no audio)."""
    return (read_data_params(data_dir, required=False).get("modalities") or {}).get("audio")


def audio_reader(section, dtype=None) -> AudioClipReader | None:
    """The clip reader of an input section whose data holds audio (None otherwise); clips are read
    from `audio_data_dir`, else the build's `dataset.audio.audio_dir`."""
    params = data_audio_params(section.data_dir)
    if params is None:
        return None
    audio_dir = section.audio_data_dir
    if audio_dir is None:
        built = ((read_data_params(section.data_dir).get("dataset") or {}).get("audio") or {})
        audio_dir = built.get("audio_dir")
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AudioClipReader(params, audio_dir, **kwargs)


def check_data_modalities(model, data_dir: str | Path) -> None:
    """Refuse data the model cannot read: images without a vision encoder, audio without an audio
    encoder, or audio counted or tokenized otherwise than the model does (MmloomError naming both)."""
    params = read_data_params(data_dir, required=False)
    samples = ((params.get("image_patch_info") or {}).get("samples") or {})
    with_images = int(samples.get("image_in_first_turn", 0) or 0) + int(samples.get("image_in_later_turn", 0) or 0)
    if with_images and "vision" not in model.encoder_names:
        raise MmloomError(f"the data in {data_dir} has {with_images} samples with an image but the model has no "
                          f"vision encoder (encoders: {model.encoder_names})")
    audio = (params.get("modalities") or {}).get("audio")
    if audio is None:
        return
    if "audio" not in model.encoder_names:
        raise MmloomError(f"the data in {data_dir} holds audio clips but the model has no audio encoder "
                          f"(encoders: {model.encoder_names}); add model.encoders.audio")
    encoder = model.encoders["audio"]
    rule = token_count_spec(encoder.config, encoder.callbacks)
    if rule != audio.get("token_count"):
        raise MmloomError(
            f"audio feature tokens are counted differently: the data in {data_dir} was built with "
            f"{audio.get('token_count')} (dataset.audio downsample/stride) but the model gives {rule} "
            "(model.encoders.audio.pooling)"
        )
    extractor = audio.get("feature_extractor") or {}
    config = base_module(encoder.module).config
    mels, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if mels is not None and extractor.get("feature_size") not in (None, mels):
        raise MmloomError(f"the data's feature extractor gives {extractor.get('feature_size')} mel bins but the audio "
                          f"encoder takes {mels} (num_mel_bins)")
    if frames is not None and extractor.get("nb_max_frames") not in (None, 2 * frames):
        raise MmloomError(f"the data's feature extractor gives {extractor.get('nb_max_frames')} frames per clip but the "
                          f"audio encoder takes {2 * frames} (2 x max_source_positions)")
    data_id, model_id = audio.get("token_id"), model.placeholder_token_ids.get("audio")
    if data_id is not None and model_id is not None and int(data_id) != int(model_id):
        raise MmloomError(
            f"the data's {audio.get('placeholder', '<audio>')} id is {data_id} but the model's audio placeholder id "
            f"is {model_id}: set model.encoders.audio.token_id: {data_id}"
        )


def with_audio(collator, model, reader: AudioClipReader | None, dummy: bool = True):
    """`collator` wrapped with `AudioCollator` when the model has an audio encoder and the data holds
    clips (a dummy clip for micro-batches without audio when `dummy`); else `collator`."""
    if reader is None or "audio" not in model.encoder_names:
        return collator
    return AudioCollator(collator, model.placeholder_token_ids["audio"], reader.dummy() if dummy else None)


def audio_processor(section) -> Any | None:
    """The feature extractor the data's clips were counted with (saved with the trained model)."""
    reader = audio_reader(section)
    return None if reader is None else reader.extractor
