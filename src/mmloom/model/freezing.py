"""Freezing by part or by regex, the eval-mode policy for frozen modules, and a summary."""

from __future__ import annotations

import re

from torch import nn

from mmloom.errors import MmloomError

# Cerebras/LLaVA config names -> mmloom parameter-name prefixes.
PATTERN_ALIASES = {
    "image_model": r"vision_encoder\.module",
    "vision_tower": r"vision_encoder\.module",
    "projector_image_model": r"vision_encoder\.projector",
    "mm_projector": r"vision_encoder\.projector",
    "text_model": r"language_model",
}
_ALIAS_RE = re.compile(r"^(\^?)(" + "|".join(sorted(PATTERN_ALIASES, key=len, reverse=True)) + r")(?![A-Za-z0-9_])")


def resolve_pattern(pattern: str) -> str:
    """Rewrite a leading Cerebras/LLaVA name (e.g. `^image_model`) to mmloom's parameter names."""
    return _ALIAS_RE.sub(lambda m: m.group(1) + PATTERN_ALIASES[m.group(2)], pattern, count=1)


def set_requires_grad_by_patterns(model: nn.Module, patterns: list[str], requires_grad: bool) -> None:
    """Set requires_grad on every parameter whose name matches one of the regexes."""
    named = list(model.named_parameters())
    for pattern in patterns:
        regex = re.compile(resolve_pattern(pattern))
        matched = [p for name, p in named if regex.search(name)]
        if not matched:
            prefixes = sorted({".".join(name.split(".")[:2]) for name, _ in named})
            raise MmloomError(
                f"freeze pattern {pattern!r} matches no parameter; names start with: {', '.join(prefixes)}"
            )
        for param in matched:
            param.requires_grad_(requires_grad)


def apply_eval_to_frozen(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen into eval mode (no dropout, fixed norms)."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def trainable_table(parts: dict[str, nn.Module]) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable parameters) per named part."""
    rows = []
    for name, module in parts.items():
        params = list(module.parameters())
        rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return rows
