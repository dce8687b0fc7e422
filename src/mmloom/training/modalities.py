"""The trainer's handling of the media of its data beyond the seed's one image per sample: which
modalities the data holds (one `MediaSpec` each, made from its `data_params.json`), their item
readers, the checks against the model, the collators that put their items in the batch, and what
the processor saved with a trained model needs for each.

Everything here iterates over the data's modalities (`mmloom.processing.media.MEDIA`), so the vision
path of the seed stays as it was and a new modality needs no change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmloom.data.collate import MediaCollator
from mmloom.data.h5_format import read_data_params
from mmloom.data.media_items import MediaItemReader
from mmloom.errors import MmloomError
from mmloom.model.feature_count import encoder_positions
from mmloom.processing.media import MEDIA
from mmloom.processing.media_spec import MediaSpec


def vision_geometry(model) -> tuple[int, int, int]:
    """(feature tokens per image, image side in pixels, encoder positions per image) of the
    model's vision encoder; (0, 0, 0) for a model without one."""
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


def data_media(data_dir: str | Path, section=None, params: dict | None = None, image_transform=None
               ) -> list[MediaSpec]:
    """The specs of a data folder's items beyond its images (`modalities` of its data_params.json, in
    `MEDIA` order), read from the input `section`'s folder setting when it gives one (the spec's
    `folder_keys[1]`), else from the folder the build read them from; the kinds the vision encoder
    runs (video) get `image_transform`.
    Raises MmloomError for a modality this mmloom does not know."""
    params = read_data_params(data_dir, required=False) if params is None else params
    recorded = params.get("modalities") or {}
    unknown = sorted(set(recorded) - set(MEDIA))
    if unknown:
        raise MmloomError(f"the data in {data_dir} holds {', '.join(unknown)} items, which this mmloom cannot read "
                          f"(modalities: {', '.join(MEDIA)})")
    return [cls.from_data(params, getattr(section, cls.folder_keys[1], None),
                          **({"transform": image_transform} if cls.shared_encoder == "vision" else {}))
            for modality, cls in MEDIA.items() if modality in recorded]


def media_readers(section, dtype: torch.dtype = torch.float32, image_transform=None) -> dict[str, MediaItemReader]:
    """The item readers of an input section's data, by modality (none for image-only data); items
    run by the vision encoder (video frames) are transformed by `image_transform`, the images'."""
    return {spec.modality: MediaItemReader(spec, dtype)
            for spec in data_media(section.data_dir, section, image_transform=image_transform)}


def check_data_media(model, data_dir: str | Path) -> None:
    """Refuse data the model cannot read: images without a vision encoder, items of another modality
    without its encoder, or items read, counted or tokenized otherwise than the model does
    (MmloomError naming both)."""
    params = read_data_params(data_dir, required=False)
    samples = ((params.get("image_patch_info") or {}).get("samples") or {})
    with_images = int(samples.get("image_in_first_turn", 0) or 0) + int(samples.get("image_in_later_turn", 0) or 0)
    if with_images and "vision" not in model.encoder_names:
        raise MmloomError(f"the data in {data_dir} has {with_images} samples with an image but the model has no "
                          f"vision encoder (encoders: {model.encoder_names})")
    for spec in data_media(data_dir, params=params):
        if spec.encoder not in model.encoder_names:
            raise MmloomError(f"the data in {data_dir} holds {spec.noun} items but the model has no {spec.encoder} "
                              f"encoder (encoders: {model.encoder_names}); add model.encoders.{spec.encoder}")
        if spec.shared_encoder is not None and spec.modality not in model.media_encoders:
            raise MmloomError(f"the data in {data_dir} holds {spec.noun} items but the model takes no {spec.noun} "
                              f"(add model.{spec.modality}: its frames through the {spec.encoder} encoder)")
        if spec.modality not in model.placeholder_token_ids:  # its slots would train as pad tokens
            raise MmloomError(f"the data in {data_dir} holds {spec.noun} items but the model takes no {spec.noun} "
                              f"(no {spec.placeholder} placeholder id: placeholder_token_ids "
                              f"{sorted(model.placeholder_token_ids)})")
        runs = model.pool(spec.modality) if spec.modality in model.media_encoders else model.encoders[spec.encoder]
        spec.check_encoder(runs, f"the data in {data_dir}")
        model_id = model.placeholder_token_ids.get(spec.modality)
        if spec.token_id is not None and model_id is not None and int(spec.token_id) != int(model_id):
            raise MmloomError(
                f"the data's {spec.placeholder} id is {spec.token_id} but the model's {spec.modality} placeholder id "
                f"is {model_id}: set model.encoders.{spec.modality}.token_id: {spec.token_id}"
            )


def with_media(collator, model, readers: dict[str, MediaItemReader], dummy: bool = True):
    """`collator` wrapped with a `MediaCollator` for each modality of `readers` the model takes (it has
    the spec's encoder and a placeholder id for the modality), with a dummy item for micro-batches
    without one when `dummy`."""
    for modality, reader in readers.items():
        if modality in model.modalities and modality in model.placeholder_token_ids:
            collator = MediaCollator(collator, modality, model.placeholder_token_ids[modality],
                                     reader.dummy() if dummy else None)
    return collator


def media_processors(section, model, image_transform=None) -> dict[str, Any]:
    """The encoder processors the data's items were counted with (saved with the trained model), for
    the modalities the model takes (video frames: `image_transform`, the images')."""
    return {spec.modality: spec.encoder_processor
            for spec in data_media(section.data_dir, section, image_transform=image_transform)
            if spec.modality in model.modalities}
