"""Freezing by part or by regex, the eval-mode policy for frozen modules, and a summary.

A PEFT-wrapped part (LoRA, IA3, prompt tuning...) is trainable through its adapters only:
making it trainable enables its active adapters and `modules_to_save` (and the biases its
PEFT config asks for: :func:`mmloom.model.adapters.enable_adapters`), never its base weights.
This holds for the language model, every encoder, `MultimodalModel.train(...)`, `unfreeze(...)`
and config-driven freezing alike.
"""

from __future__ import annotations

import re

from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.adapters import adapter_parameter_names, enable_adapters, is_peft_model, peft_parts

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
    if trainable and is_peft_model(module):
        enable_adapters(module)


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
