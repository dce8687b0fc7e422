"""Encoder and projector outputs in any form, read as per-item features.

An encoder module (or a callback) may return a `ModelOutput`, a tuple (`return_dict=False`), a
bare tensor `(N, L, D)`, one flat tensor `(total_tokens, D)` (LLaVA-NeXT-style packing, as
transformers 4.x `pack_image_features` returns it), or a list of per-item tensors `(L_i, D)`.
This module reads the features out of any of these forms and splits them into items, so that
the merge can check each sample's placeholder count against its own items' features.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput, ModelOutput

from mmloom.errors import MmloomError

Features = torch.Tensor | list[torch.Tensor]

# Encoders whose language-model-facing features are not `last_hidden_state`: the output field
# that holds them and the config attribute that gives their width. The Qwen-VL vision towers
# merge 2x2 patches in a `merger` whose output is `pooler_output` (what Qwen2-VL's own
# `get_image_features` passes to the language model).
FEATURE_OUTPUTS: dict[str, tuple[str, str]] = {
    "qwen2_vl_vision": ("pooler_output", "hidden_size"),
    "qwen2_5_vl_vision": ("pooler_output", "out_hidden_size"),
    "qwen3_vl_vision": ("pooler_output", "out_hidden_size"),
}


# Config attributes that give an encoder's feature width, in the order they are tried.
_WIDTH_ATTRIBUTES = ("hidden_size", "d_model", "embed_dim", "hidden_dim", "num_features", "width")


def encoder_hidden_size(config) -> int:
    """Width D of the features an encoder gives, from its config; ValueError when it cannot tell."""
    model_type = getattr(config, "model_type", "")
    names = (FEATURE_OUTPUTS[model_type][1],) if model_type in FEATURE_OUTPUTS else _WIDTH_ATTRIBUTES
    for name in names:
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of encoder config {type(config).__name__}")


def output_features(output) -> Features:
    """The features in an output: `last_hidden_state` of a ModelOutput (else its first field),
    `output[0]` of a tuple, a bare tensor or a list of per-item tensors as it is.
    Raises MmloomError for any other output type."""
    if isinstance(output, (torch.Tensor, list)):
        return output
    if isinstance(output, ModelOutput):
        features = getattr(output, "last_hidden_state", None)
        return features if features is not None else output[0]
    if isinstance(output, tuple):
        return output[0]
    raise MmloomError(
        f"an encoder output must be a ModelOutput, a tuple, a tensor or a list of tensors; got {type(output).__name__}"
    )


def replace_features(output, features: Features):
    """Put `features` where `output_features` reads them, keeping the output's form; a bare
    tensor or list output is simply replaced."""
    if isinstance(output, (torch.Tensor, list)):
        return features
    if isinstance(output, ModelOutput):
        if not hasattr(output, "last_hidden_state"):
            output = BaseModelOutput(last_hidden_state=features)
        output.last_hidden_state = features
        return output
    return (features, *output[1:])


def as_model_output(output):
    """Wrap a bare tensor or list in `BaseModelOutput(last_hidden_state=...)` so that callbacks
    and `output[0]` read the whole batch; ModelOutputs and tuples are returned unchanged."""
    if isinstance(output, (torch.Tensor, list)):
        return BaseModelOutput(last_hidden_state=output)
    return output


def select_feature_output(model_type: str, output):
    """For encoders listed in FEATURE_OUTPUTS, move the field the language model should see
    (e.g. Qwen2-VL's merger output `pooler_output`) to `last_hidden_state`.
    Raises MmloomError when the output lacks that field."""
    if model_type not in FEATURE_OUTPUTS or not isinstance(output, ModelOutput):
        return output
    field = FEATURE_OUTPUTS[model_type][0]
    selected = getattr(output, field, None)
    if selected is None:
        raise MmloomError(f"the {model_type} encoder's output has no {field!r}: cannot read its features")
    return BaseModelOutput(last_hidden_state=selected, hidden_states=getattr(output, "hidden_states", None))


def split_items(features: Features, item_lengths: list[int] | None = None,
                module_shape: tuple[int, int] | None = None) -> Features:
    """Per-item features: `(N, L, D)`, a list of `(L_i, D)`, or a flat `(T, D)` stream when the
    item boundaries cannot be told.

    `item_lengths` are the feature counts per item derived from the inputs (see
    `feature_count.item_token_counts`), `module_shape` the `(N, L)` of the features that
    entered the projector; either is used only when it accounts for every feature.
    Raises MmloomError for tensors that are not 2-D or 3-D.
    """
    if isinstance(features, (list, tuple)):
        items = []
        for part in features:
            if part.dim() == 3:
                items.extend(part.unbind(0))
            elif part.dim() == 2:
                items.append(part)
            else:
                raise MmloomError(f"per-item features must be (L_i, D) tensors; got one of shape {tuple(part.shape)}")
        lengths = [item.shape[0] for item in items]
        if item_lengths and lengths != list(item_lengths) and sum(lengths) == sum(item_lengths) and items:
            return list(torch.cat(items).split(list(item_lengths)))
        return items
    if not isinstance(features, torch.Tensor):
        raise MmloomError(f"features must be a tensor or a list of tensors; got {type(features).__name__}")
    if features.dim() == 3:
        n, length = features.shape[:2]
        if item_lengths and list(item_lengths) != [length] * n and sum(item_lengths) == n * length:
            return list(features.reshape(n * length, -1).split(list(item_lengths)))
        return features
    if features.dim() == 2:
        total = features.shape[0]
        if item_lengths and sum(item_lengths) == total:
            return list(features.split(list(item_lengths)))
        if module_shape is not None and module_shape[0] * module_shape[1] == total:
            return features.reshape(module_shape[0], module_shape[1], -1)
        return features
    raise MmloomError(
        f"features must be (N, L, D), (total_tokens, D) or a list of (L_i, D); got shape {tuple(features.shape)}"
    )


def feature_width(features: Features) -> int:
    """D of any features form."""
    return (features[0] if isinstance(features, (list, tuple)) else features).shape[-1]
