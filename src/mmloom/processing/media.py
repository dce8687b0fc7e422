"""The media-item specs mmloom knows, by modality: the one list every stage iterates over.

`MEDIA` maps a modality (the key of the model's `placeholder_token_ids`, of the processor's
encoder processors, of a batch's input dicts, of `data_params.json`'s `modalities`) to its
:class:`~mmloom.processing.media_spec.MediaSpec` class. Adding a modality means writing its spec
beside its loader and adding it here; the data build, the datasets and collators, the trainer's
wiring, the processor, `chat` and `generate` (and their command-line options) take it from here.

An encoder under another name (e.g. a second vision tower) gets the spec of the items its
processor takes (:func:`spec_class`), with the placeholder `<name>`.
"""

from __future__ import annotations

from typing import Any

from mmloom.processing.audio import AudioSpec, is_audio_processor
from mmloom.processing.image import ImageSpec
from mmloom.processing.media_spec import MediaSpec
from mmloom.processing.video import VideoSpec

MEDIA: dict[str, type[MediaSpec]] = {"vision": ImageSpec, "audio": AudioSpec, "video": VideoSpec}

# The placeholders of the known modalities (`<image>`, `<audio>`, `<video>`), in `MEDIA` order: what templates
# keep as pieces of their own and move to the front of a turn.
PLACEHOLDERS: tuple[str, ...] = tuple(spec.default_placeholder for spec in MEDIA.values())


def default_placeholder(modality: str) -> str:
    """The placeholder of a modality when none is given: its spec's (`<image>`, `<audio>`), else `<name>`."""
    spec = MEDIA.get(modality)
    return spec.default_placeholder if spec is not None else f"<{modality}>"


def default_token_id(modality: str, vocab_size: int, index: int) -> int:
    """A placeholder id when a config gives none: the one `mmloom data build` gives a placeholder the
    tokenizer lacks (`<image>` = vocab_size, `<audio>` = vocab_size + 1, `<video>` = vocab_size + 2: `token_offset`), then
    other encoders after them (`index`: the encoder's position in the model)."""
    spec = MEDIA.get(modality)
    return vocab_size + (spec.token_offset if spec is not None else len(MEDIA) + index)


def spec_class(modality: str, encoder_processor: Any = None) -> type[MediaSpec]:
    """The spec class of a modality: its `MEDIA` entry, else (an encoder under another name) by
    what its processor takes: audio for a feature extractor of waveforms, images otherwise."""
    if modality in MEDIA:
        return MEDIA[modality]
    return AudioSpec if is_audio_processor(encoder_processor) else ImageSpec


def spec_for_processor(modality: str, encoder_processor: Any, placeholder: str | None = None,
                       token_id: int | None = None, count: Any = None, anyres: dict | None = None,
                       sampling: dict | None = None) -> MediaSpec:
    """The spec of one modality of a `MultimodalProcessor`: its placeholder and id, its encoder
    processor (image transform, feature extractor), its count rule (`num_tokens`, `anyres`) and how
    its items are sampled (`sampling`: video frames)."""
    cls = spec_class(modality, encoder_processor)
    record_key = modality if modality not in MEDIA else None
    return cls.from_processor(modality, encoder_processor, placeholder=placeholder or default_placeholder(modality),
                              token_id=token_id, count=count, anyres=anyres, record_key=record_key,
                              sampling=sampling)
