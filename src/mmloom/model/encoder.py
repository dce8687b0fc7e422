"""One modality: an HF encoder, its projector and the three callbacks around them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers.modeling_outputs import ModelOutput

from mmloom.model.callbacks import SerializableCallback, replace_features
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig

CALLBACK_SLOTS = ("preprocess_callback", "postprocess_module_callback", "postprocess_projector_callback")


def base_module(module: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def forward_parameter_names(module: nn.Module) -> frozenset[str]:
    """Explicitly named forward arguments of a module (ignores *args/**kwargs)."""
    return _named_arguments(type(base_module(module)).forward)


@functools.cache
def _named_arguments(function) -> frozenset[str]:  # cached: it runs on every forward
    params = inspect.signature(function).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}


def encoder_hidden_size(config) -> int:
    for name in ("hidden_size", "d_model", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of encoder config {type(config).__name__}")


class ModalEncoderModule(nn.Module):
    """An encoder of one modality, its projector, and callbacks, run in this order:

    preprocess_callback(inputs) -> inputs; module(**inputs);
    postprocess_module_callback(inputs, output) -> output; projector(output[0]);
    postprocess_projector_callback(inputs, output) -> output.
    `output[0]` is then (N_items, L, D_llm) features, or a list of (L_i, D_llm).
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
        return base_module(self.module).config

    @property
    def callbacks(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in CALLBACK_SLOTS}

    def accepted_inputs(self) -> set[str]:
        """Input names this encoder takes: its module's forward arguments and its callbacks' inputs."""
        names = set(forward_parameter_names(self.module))
        for callback in self.callbacks.values():
            names |= set(getattr(callback, "input_names", ()))
        return (names | {"module_features"}) - {"return_dict", "output_hidden_states", "output_attentions", "kwargs"}

    def feature_dim(self) -> int:
        """Width of the features the projector receives."""
        hidden = encoder_hidden_size(self.config)
        select = self.postprocess_module_callback
        return select.output_dim(hidden) if isinstance(select, SerializableCallback) else hidden

    def encode_module(self, **inputs) -> ModelOutput | tuple:
        """The module's output after `postprocess_module_callback`: what the projector receives.

        This is what `mmloom data cache-features` stores for a frozen encoder.
        """
        module_args = forward_parameter_names(self.module)
        module_inputs = {k: v for k, v in inputs.items() if k in module_args}
        for callback in self.callbacks.values():
            module_inputs.update(getattr(callback, "module_kwargs", {}))
        output = self.module(**module_inputs)
        if self.postprocess_module_callback is not None:
            output = self.postprocess_module_callback(inputs, output)
        return output

    def forward(self, **inputs) -> ModelOutput | tuple:
        """Encode, project and post-process one modality's inputs.

        `module_features` (N, L, D_enc), e.g. cached features of a frozen encoder, replaces the
        module and its callback: only the projector and its callback run.
        """
        if self.preprocess_callback is not None:
            inputs = self.preprocess_callback(inputs)
        cached = inputs.get("module_features")
        output = (cached,) if cached is not None else self.encode_module(**inputs)
        projected = self.projector(output[0].to(self.projector.dtype))  # (N, L, D_llm)
        output = (projected,) if isinstance(output, tuple) else replace_features(output, projected)
        if self.postprocess_projector_callback is not None:
            output = self.postprocess_projector_callback(inputs, output)
        return output
