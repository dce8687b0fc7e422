"""Freezing by part or by regex, the eval-mode policy for frozen modules, and a summary.

A PEFT-wrapped part (LoRA, IA3, prompt tuning...) is trainable through its adapters only:
making it trainable enables its active adapters and `modules_to_save` (and the biases its
PEFT config asks for), never its base weights. This holds for the language model, every
encoder, `MultimodalModel.train(...)`, `unfreeze(...)` and config-driven freezing alike.
"""

from __future__ import annotations

import re

from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.encoder import is_peft_model

# Cerebras/LLaVA config names -> mmloom parameter-name prefixes.
PATTERN_ALIASES = {
    "image_model": r"vision_encoder\.module",
    "vision_tower": r"vision_encoder\.module",
    "projector_image_model": r"vision_encoder\.projector",
    "mm_projector": r"vision_encoder\.projector",
    "text_model": r"language_model",
    "audio_model": r"audio_encoder\.module",
    "projector_audio_model": r"audio_encoder\.projector",
}
_ALIAS_RE = re.compile(r"^(\^?)(" + "|".join(sorted(PATTERN_ALIASES, key=len, reverse=True)) + r")(?![A-Za-z0-9_])")


def resolve_pattern(pattern: str) -> str:
    """Rewrite a leading Cerebras/LLaVA name (e.g. `^image_model`) to mmloom's parameter names."""
    return _ALIAS_RE.sub(lambda m: m.group(1) + PATTERN_ALIASES[m.group(2)], pattern, count=1)


def set_part_trainable(module: nn.Module, trainable: bool) -> None:
    """Set requires_grad for one part. For a PEFT-wrapped part, `True` trains only its active
    adapters, `modules_to_save` and the biases its config names (`bias="all"` / `"*_only"`),
    as PEFT's own `get_peft_model` leaves them; the base weights stay frozen."""
    module.requires_grad_(bool(trainable) and not is_peft_model(module))
    if not trainable or not is_peft_model(module):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.tuners_utils import set_requires_grad as peft_set_requires_grad

    adapters = list(module.active_adapters)
    # Adapter layers and auxiliary wrappers (modules_to_save) of the active adapters.
    peft_set_requires_grad(module, adapter_names=adapters, requires_grad=True)
    prompt_encoder = getattr(module, "prompt_encoder", None)
    if prompt_encoder is not None:  # prompt learning (prefix / prompt tuning, p-tuning)
        for name in adapters:
            if name in prompt_encoder:
                prompt_encoder[name].requires_grad_(True)
    for name in adapters:
        bias = getattr(module.peft_config[name], "bias", "none") or "none"
        if bias == "all":
            for pname, param in module.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    param.requires_grad_(True)
        elif bias.endswith("_only"):
            for sub in module.modules():
                if isinstance(sub, BaseTunerLayer) and getattr(sub.get_base_layer(), "bias", None) is not None:
                    sub.get_base_layer().bias.requires_grad_(True)


def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (relative to `module`) of the parameters `set_part_trainable(module, True)` enables:
    the adapters of a PEFT part, every parameter of a plain one. requires_grad is unchanged."""
    params = dict(module.named_parameters())
    if not is_peft_model(module):
        return set(params)
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        set_part_trainable(module, True)
        return {name for name, p in params.items() if p.requires_grad}
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def peft_parts(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT-wrapped submodules of `model` by their qualified name."""
    return {name: module for name, module in model.named_modules() if name and is_peft_model(module)}


def set_requires_grad_by_patterns(model: nn.Module, patterns: list[str], requires_grad: bool) -> None:
    """Set requires_grad on every parameter whose name matches one of the regexes.

    Unfreezing never enables the base weights of a PEFT-wrapped part (only its adapters):
    a pattern that matches nothing else raises MmloomError. Freezing applies to anything."""
    named = list(model.named_parameters())
    base_weights: set[str] = set()
    if requires_grad:
        for prefix, part in peft_parts(model).items():
            adapters = adapter_parameter_names(part)
            base_weights |= {f"{prefix}.{n}" for n, _ in part.named_parameters() if n not in adapters}
    for pattern in patterns:
        regex = re.compile(resolve_pattern(pattern))
        matched = [(name, p) for name, p in named if regex.search(name)]
        if not matched:
            prefixes = sorted({".".join(name.split(".")[:2]) for name, _ in named})
            raise MmloomError(
                f"freeze pattern {pattern!r} matches no parameter; names start with: {', '.join(prefixes)}"
            )
        allowed = [(name, p) for name, p in matched if name not in base_weights]
        if not allowed:
            raise MmloomError(
                f"unfreeze pattern {pattern!r} matches only base weights of a PEFT-wrapped part (e.g. "
                f"{matched[0][0]}); they stay frozen so that LoRA does not become full fine-tuning. Train them "
                "with PEFT's modules_to_save, or unwrap the part"
            )
        for _, param in allowed:
            param.requires_grad_(requires_grad)


def apply_eval_to_frozen(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen into eval mode (no dropout, fixed norms)."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            if module is model:  # a wholly frozen model keeps its own flag (its train() calls back here)
                for child in module.children():
                    child.eval()
            else:
                module.eval()


def trainable_table(parts: dict[str, nn.Module]) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable parameters) per named part."""
    rows = []
    for name, module in parts.items():
        params = list(module.parameters())
        rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return rows
