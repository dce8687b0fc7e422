"""How many feature tokens an encoder item produces, derived from configs alone.

The processor uses this to expand each placeholder to the exact number of features the
composite model will merge, without needing the model itself.
"""

from __future__ import annotations

from mmloom.errors import MmloomError
from mmloom.model.callbacks import AnyresPack, FeatureSelect

# Vision encoders whose sequence starts with a CLS token.
CLS_MODEL_TYPES = {"clip_vision_model", "clip", "vit", "deit", "dinov2", "beit", "data2vec-vision", "vit_msn"}


def encoder_positions(config) -> int:
    """Length of the encoder's output sequence for one item."""
    model_type = getattr(config, "model_type", "")
    if model_type == "whisper":
        return config.max_source_positions
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size and patch_size:
        side = (image_size if isinstance(image_size, int) else image_size[0]) // (
            patch_size if isinstance(patch_size, int) else patch_size[0]
        )
        return side * side + (1 if model_type in CLS_MODEL_TYPES else 0)
    raise MmloomError(
        f"cannot derive the number of feature tokens for encoder type {model_type!r}; "
        "pass num_tokens explicitly to the processor"
    )


def feature_tokens_per_item(config, callbacks: dict, image_size_hw=None) -> int:
    """Feature tokens for one item: encoder positions, after feature selection and packing."""
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
