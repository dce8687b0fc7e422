"""One modality: an HF encoder, its projector and the three callbacks around them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from mmloom.errors import MmloomError
from mmloom.model.adapters import base_module
from mmloom.model.callbacks import SerializableCallback
from mmloom.model.feature_count import encoder_item_counts
from mmloom.model.outputs import (
    Features,
    as_model_output,
    encoder_hidden_size,
    output_features,
    replace_features,
    select_feature_output,
    split_items,
)
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig

CALLBACK_SLOTS = ("preprocess_callback", "postprocess_module_callback", "postprocess_projector_callback")

# Names the encoder's own processor gives its outputs -> the module's forward argument names
# (Qwen2-VL's image processor returns pixel_values / image_grid_thw; its vision tower takes
# hidden_states / grid_thw).
PROCESSOR_INPUT_ALIASES: dict[str, dict[str, str]] = {
    model_type: {"pixel_values": "hidden_states", "image_grid_thw": "grid_thw"}
    for model_type in ("qwen2_vl_vision", "qwen2_5_vl_vision", "qwen3_vl_vision")
}


def forward_parameter_names(module: nn.Module) -> frozenset[str]:
    """Explicitly named forward arguments of a module (ignores *args/**kwargs)."""
    return _named_arguments(type(base_module(module)).forward)[0]


def forward_takes_kwargs(module: nn.Module) -> bool:
    """Whether a module's forward takes **kwargs (extra keyword arguments reach it)."""
    return _named_arguments(type(base_module(module)).forward)[1]


@functools.cache
def _named_arguments(function) -> tuple[frozenset[str], bool]:  # cached: it runs on every forward
    params = inspect.signature(function).parameters.values()
    named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """dtype of a module's first floating-point parameter (what its inputs must be), else None."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def cast_floating(value: Any, dtype: torch.dtype | None) -> Any:
    """Cast floating-point tensors (also inside lists/tuples/dicts) to `dtype`; others unchanged."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


def output_width_from_structure(module: nn.Module) -> int | None:
    """Width of a module's output read from its last registered output layer (norm, Linear,
    convolution) when no config tells; None if it has none."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.Linear):
            return sub.out_features
        if isinstance(sub, (nn.LayerNorm, nn.GroupNorm)) or type(sub).__name__.endswith("RMSNorm"):
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 1:
                return weight.shape[0]
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
    return None


class ModalEncoderModule(nn.Module):
    """An encoder of one modality, its projector, and callbacks, run in this order:

    preprocess_callback(inputs) -> inputs; module(**inputs);
    postprocess_module_callback(inputs, output) -> output; projector(features);
    postprocess_projector_callback(inputs, output) -> output.

    `output` is a ModelOutput or a tuple; a module (or callback) that returns a bare tensor
    `(N, L, D)` or a list is wrapped in `BaseModelOutput(last_hidden_state=...)`. The features
    may be `(N, L, D)`, a flat `(total_tokens, D)` or a list of `(L_i, D)`; `forward` returns
    them split per item where the item counts can be derived (see `model.outputs.split_items`).
    Floating-point inputs are cast to the module's dtype (any dtype layout works).
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        projector: MultimodalProjector | None = None,
        preprocess_callback: Callable | None = None,
        postprocess_module_callback: Callable | None = None,
        postprocess_projector_callback: Callable | None = None,
        *,
        model: nn.Module | None = None,
    ):
        super().__init__()
        module = module if module is not None else model  # the seed also spells it `model=`
        if module is None:
            raise TypeError("ModalEncoderModule needs an encoder module")
        self.module = module
        self.projector = projector if projector is not None else MultimodalProjector(MultimodalProjectorConfig())
        # Callbacks that are nn.Modules (e.g. AnyresPack's newline) are registered so they save.
        self.preprocess_callback = preprocess_callback
        self.postprocess_module_callback = postprocess_module_callback
        self.postprocess_projector_callback = postprocess_projector_callback

    @property
    def config(self):
        """The HF config of the wrapped module (inside a PEFT wrapper too); None for a plain nn.Module."""
        return getattr(base_module(self.module), "config", None)

    @property
    def model_type(self) -> str:
        """The module config's ``model_type`` (``"clip_vision_model"``, ``"whisper"`` ...), "" without one."""
        return getattr(self.config, "model_type", "") or ""

    @property
    def callbacks(self) -> dict[str, Any]:
        """{slot name: callback or None} for the three `CALLBACK_SLOTS`."""
        return {slot: getattr(self, slot) for slot in CALLBACK_SLOTS}

    @property
    def input_aliases(self) -> dict[str, str]:
        """{processor output name: forward argument name} for towers whose processor names an input
        differently (Qwen2-VL: ``pixel_values`` -> ``hidden_states``); {} for the others."""
        return PROCESSOR_INPUT_ALIASES.get(self.model_type, {})

    def accepted_inputs(self) -> set[str]:
        """Input names this encoder takes: its module's forward arguments (and the names its
        processor uses for them), and its callbacks' inputs."""
        names = set(forward_parameter_names(self.module)) | set(self.input_aliases)
        for callback in self.callbacks.values():
            names |= set(getattr(callback, "input_names", ()))
        return (names | {"module_features"}) - {"return_dict", "output_hidden_states", "output_attentions", "kwargs"}

    def feature_dim(self) -> int:
        """Width of the features the projector receives: from the encoder's config (Qwen-VL: its
        merger's output), else from its last output layer; MmloomError if neither tells."""
        try:
            hidden = encoder_hidden_size(self.config)
        except ValueError:
            hidden = output_width_from_structure(base_module(self.module))
            if hidden is None:
                raise MmloomError(
                    f"cannot tell the width of {type(base_module(self.module)).__name__}'s features: give its "
                    "projector explicitly, MultimodalProjector(MultimodalProjectorConfig(in_features=D))"
                ) from None
        select = self.postprocess_module_callback
        return select.output_dim(hidden) if isinstance(select, SerializableCallback) else hidden

    def encode_module(self, **inputs) -> ModelOutput | tuple:
        """The module's output after `postprocess_module_callback`: what the projector receives.

        Processor input names are mapped to the module's (Qwen2-VL), floating inputs are cast to
        the module's dtype, a bare tensor or list output is wrapped in a BaseModelOutput, and
        encoders whose language-model features are another output field (Qwen-VL's merger
        output) have it moved to `last_hidden_state`. This is what `mmloom data cache-features`
        stores for a frozen encoder.
        """
        aliases = self.input_aliases
        renamed = {aliases.get(k, k): v for k, v in inputs.items()}
        module_args = forward_parameter_names(self.module)
        module_inputs = {k: v for k, v in renamed.items() if k in module_args}
        for callback in self.callbacks.values():
            module_inputs.update(getattr(callback, "module_kwargs", {}))
        module_inputs = cast_floating(module_inputs, module_dtype(self.module))
        output = select_feature_output(self.model_type, as_model_output(self.module(**module_inputs)))
        if self.postprocess_module_callback is not None:
            output = as_model_output(self.postprocess_module_callback(inputs, output))
        return output

    def forward(self, **inputs) -> ModelOutput | tuple:
        """Encode, project and post-process one modality's inputs.

        `module_features` (N, L, D_enc), e.g. cached features of a frozen encoder, replaces the
        module and its callback: only the projector and its callback run. The returned output's
        features are `(N, L, D_llm)`, a list of `(L_i, D_llm)`, or a flat `(T, D_llm)` stream when
        item boundaries cannot be told.
        """
        if self.preprocess_callback is not None:
            inputs = self.preprocess_callback(inputs)
        output, module_shape = self.project(**inputs)
        if self.postprocess_projector_callback is not None:
            output = as_model_output(self.postprocess_projector_callback(inputs, output))
        counts = encoder_item_counts(self.config, self.callbacks, inputs, self._num_items(inputs, module_shape))
        return replace_features(output, split_items(output_features(output), counts, module_shape))

    def project(self, **inputs) -> tuple[ModelOutput, tuple[int, int] | None]:
        """The module's features (or `module_features`, cached) through the projector, without the
        projector callback: `(output, (N, L))`, the output's features `(N, L, D_llm)` per image row
        (None instead of `(N, L)` when the module gives no `(N, L, D)` tensor). What `forward` packs or
        pools per item, and what a modality sharing this encoder pools its own way (video frames)."""
        cached = inputs.get("module_features")
        output = as_model_output(cached) if cached is not None else self.encode_module(**inputs)
        features = output_features(output)
        module_shape = tuple(features.shape[:2]) if isinstance(features, torch.Tensor) and features.dim() == 3 else None
        return replace_features(output, self.projector(features)), module_shape

    def _num_items(self, inputs: dict[str, Any], module_shape) -> int | None:
        """Items in a batch of a fixed-size encoder: the leading dim of its main input."""
        if module_shape is not None:
            return module_shape[0]
        main = inputs.get(getattr(base_module(self.module), "main_input_name", None) or "")
        return main.shape[0] if isinstance(main, torch.Tensor) and main.dim() > 1 else None

    def item_features(self, **inputs) -> Features:
        """Projected features of a batch of inputs, per item (see `forward`)."""
        return output_features(self(**inputs))
