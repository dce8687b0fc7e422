"""How many feature tokens an encoder item produces: from configs, or from what the encoder's
own processor returns where the config cannot tell (variable-resolution encoders).

The processor uses this to expand each placeholder to the exact number of features the
composite model will merge, and the model uses it to split flat encoder outputs into items.

Fixed-size encoders (CLIP, SigLIP, Whisper...): positions from `image_size`/`patch_size` or
`max_source_positions`, minus a CLS token dropped by `FeatureSelect`.
Variable-resolution encoders (the count depends on each item), from the processor's outputs:
  - Pixtral: `image_sizes` (N, 2) as (height, width) after resizing -> (h // patch) * (w // patch)
    (PixtralVisionModel crops each image's patch grid to its size);
  - Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision: `image_grid_thw` (N, 3) -> t * h * w / merge**2
    (the merger output, as in transformers' Qwen2-VL `get_image_features`).
Audio encoders with an `AudioPool` callback (the count depends on each clip's length), from the
feature extractor's frame mask (`feature_attention_mask`, the extractor's `attention_mask`):
ceil(ceil(frames / downsample) / stride) per clip (`callbacks.audio_token_count`), as
Qwen2-Audio's processor counts its audio tokens from the same mask.
"""

from __future__ import annotations

from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.model.callbacks import AnyresPack, AudioPool, FeatureSelect, audio_token_count

# Vision encoders whose sequence starts with a CLS token.
CLS_MODEL_TYPES = {"clip_vision_model", "clip", "vit", "deit", "dinov2", "beit", "data2vec-vision", "vit_msn"}

# Variable-resolution encoders: model type -> how a processor output gives per-item counts.
PATCH_GRID = "image_sizes_patch_grid"  # Pixtral: (h // patch) * (w // patch) per image_sizes row
MERGED_GRID = "grid_thw_merged"  # Qwen-VL: t * h * w // merge**2 per image_grid_thw row
VARIABLE_RESOLUTION = {
    "pixtral": PATCH_GRID,
    "qwen2_vl_vision": MERGED_GRID,
    "qwen2_5_vl_vision": MERGED_GRID,
    "qwen3_vl_vision": MERGED_GRID,
}
# Input names under which the processors return the per-item sizes (first found wins).
AUDIO_FRAMES = "audio_frames"  # AudioPool: per-clip real frames of the extractor's mask
_SIZE_INPUTS = {PATCH_GRID: ("image_sizes",), MERGED_GRID: ("image_grid_thw", "grid_thw"),
                AUDIO_FRAMES: ("feature_attention_mask", "attention_mask")}


def _side(value) -> int:
    return value if isinstance(value, int) else value[0]


def variable_token_spec(config) -> dict[str, Any] | None:
    """For a variable-resolution encoder, the JSON-serialisable rule that turns its processor's
    outputs into per-item counts (`{"type": ..., ...}`); None for fixed-size encoders."""
    kind = VARIABLE_RESOLUTION.get(getattr(config, "model_type", ""))
    if kind == PATCH_GRID:
        return {"type": kind, "patch_size": _side(config.patch_size)}
    if kind == MERGED_GRID:
        return {"type": kind, "merge_size": int(config.spatial_merge_size)}
    return None


# Vision encoders whose sequence has no CLS token: every position is a patch.
NO_CLS_MODEL_TYPES = {"siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2", "pixtral",
                      "qwen2_vl_vision", "qwen2_5_vl_vision", "qwen3_vl_vision", "idefics3_vision",
                      "smolvlm_vision"}


def default_feature_strategy(config) -> str:
    """The `FeatureSelect` strategy for a vision tower when none is given: ``patch`` (drop the CLS,
    LLaVA-1.5's choice) for towers with a CLS token, ``full`` (keep every position) for the others
    (SigLIP: LLaVA-OneVision's choice), where dropping the first position would drop a real patch."""
    return "patch" if has_cls_token(config) else "full"


def check_feature_strategy(config, strategy: str, what: str) -> None:
    """Refuse (MmloomError, one line naming `what`, the option that set it) a strategy that drops the
    first position of a tower known to have no CLS token (SigLIP ...): it would drop a real patch."""
    model_type = getattr(config, "model_type", "")
    if strategy in ("patch", "default") and model_type in NO_CLS_MODEL_TYPES:
        raise MmloomError(
            f"{what} {strategy!r} drops the first position, but a {model_type} tower has no CLS token: that "
            "position is a real image patch; use 'full' (every patch; the default for such towers)"
        )


def has_cls_token(config) -> bool:
    """Whether a vision encoder's output sequence starts with a CLS token (CLIP, ViT, DINOv2 ...;
    not SigLIP, Pixtral or Qwen2-VL), from its config's `model_type` (`CLS_MODEL_TYPES`)."""
    return getattr(config, "model_type", "") in CLS_MODEL_TYPES


def encoder_positions(config) -> int:
    """Length of the encoder's output sequence for one item of a fixed-size encoder.

    Raises MmloomError for variable-resolution encoders (their count depends on each item)
    and for encoders whose config does not tell."""
    model_type = getattr(config, "model_type", "")
    if model_type in VARIABLE_RESOLUTION:
        raise MmloomError(
            f"{model_type} is a variable-resolution encoder: its feature tokens depend on each item and "
            f"come from what its processor returns ({', '.join(_SIZE_INPUTS[VARIABLE_RESOLUTION[model_type]])}); "
            "use MultimodalProcessor.from_model(...) or item_token_counts(...)"
        )
    if model_type == "whisper":
        return config.max_source_positions
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size and patch_size:
        side = _side(image_size) // _side(patch_size)
        return side * side + (1 if has_cls_token(config) else 0)
    raise MmloomError(
        f"cannot derive the number of feature tokens for encoder type {model_type!r}; "
        "pass num_tokens explicitly to the processor"
    )


def audio_token_spec(callbacks: dict) -> dict[str, Any] | None:
    """The count rule of an audio encoder whose module callback is an `AudioPool` (None otherwise)."""
    pool = callbacks.get("postprocess_module_callback")
    if isinstance(pool, AudioPool):
        return {"type": AUDIO_FRAMES, "downsample": pool.downsample, "stride": pool.stride}
    return None


def num_feature_tokens(config, callbacks: dict, image_size_hw=None) -> int:
    """Feature tokens for one item: encoder positions, after feature selection and packing.

    Raises MmloomError where one number cannot tell (anyres without the image size,
    variable-resolution encoders and pooled audio: see `item_token_counts`)."""
    if audio_token_spec(callbacks) is not None:
        raise MmloomError(
            "audio pooled with AudioPool has one feature-token count per clip (from its length): use "
            "item_token_counts(...) with the feature extractor's outputs"
        )
    projector_cb = callbacks.get("postprocess_projector_callback")
    if isinstance(projector_cb, AnyresPack):
        if image_size_hw is None:
            raise MmloomError("anyres packing needs each image's (height, width) to count its tokens")
        return projector_cb.num_tokens(image_size_hw)
    positions = encoder_positions(config)
    select = callbacks.get("postprocess_module_callback")
    if isinstance(select, FeatureSelect) and select.drops_cls:
        positions -= 1
    return positions


def token_count_spec(config, callbacks: dict) -> int | dict[str, Any]:
    """What a processor stores per modality: one count per item for fixed-size encoders, or the
    rule (`variable_token_spec`) that reads per-item counts from the encoder processor's outputs."""
    spec = audio_token_spec(callbacks) or variable_token_spec(config)
    return spec if spec is not None else num_feature_tokens(config, callbacks)


def counts_from_inputs(spec: dict[str, Any], inputs: dict[str, Any]) -> list[int] | None:
    """Per-item feature counts from an encoder processor's outputs (or the encoder's inputs),
    following `spec`; None when the inputs lack the sizes."""
    sizes = next((inputs[name] for name in _SIZE_INPUTS[spec["type"]] if inputs.get(name) is not None), None)
    if sizes is None:
        return None
    if spec["type"] == AUDIO_FRAMES:
        mask = torch.as_tensor(sizes)
        frames = mask.reshape(mask.shape[0], -1).sum(-1).tolist() if mask.dim() else []
        return [audio_token_count(int(f), spec["downsample"], spec["stride"]) for f in frames]
    rows = torch.as_tensor(sizes).reshape(-1, 3 if spec["type"] == MERGED_GRID else 2).tolist()
    if spec["type"] == PATCH_GRID:
        patch = spec["patch_size"]
        return [(int(h) // patch) * (int(w) // patch) for h, w in rows]
    merge = spec["merge_size"] ** 2
    return [int(t) * int(h) * int(w) // merge for t, h, w in rows]


def item_token_counts(spec: int | dict[str, Any], items: list[Any], encoder_processor=None) -> list[int]:
    """Feature tokens of each item: `spec` items of a fixed count, or (variable resolution) the
    counts read from what `encoder_processor` returns for the items (e.g. Pixtral's
    `image_sizes`, Qwen2-VL's `image_grid_thw`, an audio feature extractor's frame mask; audio
    items are waveforms at the extractor's rate).
    Raises MmloomError when a variable count has no processor, or its outputs do not give one size per
    item."""
    if isinstance(spec, int):
        return [spec] * len(items)
    if not items:
        return []
    if encoder_processor is None:
        raise MmloomError(f"counting {spec['type']} feature tokens needs the encoder's own processor")
    if spec["type"] == AUDIO_FRAMES:
        kwargs = {"return_attention_mask": True, "sampling_rate": getattr(encoder_processor, "sampling_rate", None)}
    else:
        kwargs = {}
    counts = counts_from_inputs(spec, dict(encoder_processor(items, return_tensors="pt", **kwargs)))
    if counts is None or len(counts) != len(items):
        raise MmloomError(
            f"the {type(encoder_processor).__name__} outputs do not give one size per item "
            f"({', '.join(_SIZE_INPUTS[spec['type']])}); cannot count feature tokens"
        )
    return counts


def encoder_item_counts(config, callbacks: dict, inputs: dict[str, Any], num_items: int | None) -> list[int] | None:
    """Per-item feature counts the model expects for a batch of encoder `inputs`, or None when
    they cannot be derived (e.g. an arbitrary callable reshapes the features)."""
    pool = callbacks.get("postprocess_module_callback")
    if isinstance(pool, AudioPool):
        return pool.item_counts(inputs)
    spec = variable_token_spec(config)
    if spec is not None:
        return counts_from_inputs(spec, inputs)
    packer = callbacks.get("postprocess_projector_callback")
    if isinstance(packer, AnyresPack):
        sizes = inputs.get("image_sizes")
        return None if sizes is None else [packer.num_tokens(size) for size in torch.as_tensor(sizes).tolist()]
    if num_items is None:
        return None
    try:
        return [num_feature_tokens(config, callbacks)] * num_items
    except MmloomError:
        return None
