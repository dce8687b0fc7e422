"""Gradient checkpointing across a composite's parts, frozen parts included.

transformers checkpoints a layer (`GradientCheckpointingLayer`) only while the layer is in
training mode, but mmloom keeps frozen parts in eval mode so that their dropout stays off. In
LLaVA phase 1 the loss gradient flows back through the whole frozen LLM to reach the
projector, so without more, checkpointing would save nothing exactly where LLaVA relies on it.

mmloom's choice: checkpointing does not depend on the training flag. Each checkpointed layer
that is fully frozen (while the composite is in train mode) reports `training=True` to
transformers' checkpoint switch whenever gradients are enabled, and its body runs under a
checkpoint function that sets the layer back to eval for the forward pass and for the
recomputation in backward alike. Its submodules stay in eval mode throughout. So frozen
layers keep dropout off, are checkpointed like trainable ones, and give the same gradients.
Layers that train are untouched (transformers' own behaviour).

The switch is set by a forward pre-hook on each such layer and, for transformers releases that
test the training flag in `__call__` before a layer's own hooks run (5.21-5.23), by a forward
pre-hook on the model `sync_frozen_checkpointing` was called on, which runs before any layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

_HOOK = "_mmloom_checkpoint_hook"
_MODEL_HOOK = "_mmloom_frozen_checkpoint_hook"


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _eval_body(layer: nn.Module, checkpoint_func: Callable, function: Callable, *args, **kwargs):
    """Checkpoint `function` (the layer's forward) with the layer in eval mode while it runs."""

    def body(*a, **k):
        was = layer.training
        layer.training = False
        layer._mmloom_in_body = True  # transformers < 5.24 runs the layer's hooks inside the body
        try:
            return function(*a, **k)
        finally:
            layer.training = was
            layer._mmloom_in_body = False

    return checkpoint_func(body, *args, **kwargs)


def _grad_mode_pre_hook(layer: nn.Module, args) -> None:
    # Train mode only when there is a backward to checkpoint for; without gradients the layer
    # runs as the frozen (eval) layer it is.
    if not getattr(layer, "_mmloom_in_body", False):
        layer.training = torch.is_grad_enabled()


def _is_wrapped(func) -> bool:
    return isinstance(func, functools.partial) and func.func is _eval_body


def _attach(layer: nn.Module) -> None:
    current = layer._gradient_checkpointing_func
    if not _is_wrapped(current):  # also after transformers re-enabled checkpointing (a new function)
        layer._gradient_checkpointing_func = functools.partial(_eval_body, layer, current)
    if getattr(layer, _HOOK, None) is None:
        setattr(layer, _HOOK, layer.register_forward_pre_hook(_grad_mode_pre_hook))


def _detach(layer: nn.Module) -> bool:
    """Undo `_attach`; True if the layer was attached."""
    current = getattr(layer, "_gradient_checkpointing_func", None)
    if _is_wrapped(current):
        layer._gradient_checkpointing_func = current.args[1]
    handle = getattr(layer, _HOOK, None)
    if handle is None:
        return False
    handle.remove()
    setattr(layer, _HOOK, None)
    return True


def sync_frozen_checkpointing(model: nn.Module) -> None:
    """Make gradient checkpointing effective in the frozen layers of `model` (see the module
    docstring); undo it for layers that train again, lose checkpointing, or when `model` is in
    eval mode. Call after any change of requires_grad, train/eval mode or checkpointing."""
    attached = []
    for layer in _checkpointing_layers(model):
        wanted = (
            model.training
            and getattr(layer, "gradient_checkpointing", False)
            and getattr(layer, "_gradient_checkpointing_func", None) is not None
            and _is_frozen(layer)
        )
        if wanted:
            _attach(layer)
            attached.append(layer)
        elif _detach(layer) and _is_frozen(layer):
            layer.training = False
    handle = getattr(model, _MODEL_HOOK, None)
    if handle is not None:
        handle.remove()
        setattr(model, _MODEL_HOOK, None)
    if attached:
        def set_switches(_module, _args) -> None:
            for layer in attached:
                _grad_mode_pre_hook(layer, ())

        setattr(model, _MODEL_HOOK, model.register_forward_pre_hook(set_switches))


def enable_checkpointing(module: nn.Module, kwargs: dict) -> None:
    """transformers' activation checkpointing on one HF model (new name, else the old one)."""
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(module: nn.Module) -> None:
    """Turn transformers' activation checkpointing off on one HF model (new name, else the old one)."""
    if hasattr(module, "activation_checkpointing_disable"):
        module.activation_checkpointing_disable()
    else:
        module.gradient_checkpointing_disable()
