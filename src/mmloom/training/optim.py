"""AdamW parameter groups (no decay on biases and norms, a learning rate per part) and lr schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.adapters import is_adapter
from mmloom.training.config import OptimizerSection, ScheduleSection

_NORM_RE = re.compile(r"(norm|ln_|layernorm|layer_norm)", re.IGNORECASE)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-d parameters get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or bool(_NORM_RE.search(name))


def is_projector(name: str) -> bool:
    return ".projector." in f".{name}"


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def part_of(name: str) -> str:
    """The part a parameter belongs to (`MultimodalModel.parts` names): `{encoder}_encoder.module`,
    `{encoder}_encoder.projector`, `{encoder}_encoder.{callback slot}` or `language_model`; DDP /
    torch.compile wrapper prefixes are ignored. Other names are returned as their first component."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    head, _, rest = name.partition(".")
    if head.endswith("_encoder") and rest:
        return f"{head}.{rest.split('.', 1)[0]}"
    return head


def _part_lrs(opt: OptimizerSection) -> dict[str, float]:
    from mmloom.model.freezing import resolve_pattern

    out = {}
    for key, lr in opt.part_lr.items():
        out[resolve_pattern(key).replace("\\.", ".")] = lr
    return out


def lr_group(name: str, opt: OptimizerSection, part_lrs: dict[str, float] | None = None) -> tuple[str, float]:
    """(group label, peak lr) of a trainable parameter, the most specific setting first: `part_lr` of its
    part, `adapter_lr` for LoRA weights, `projector_lr` / `encoder_lr` / `llm_lr` by part, else `lr`.
    Parameters at `lr` share the label `model` (so that a config with `projector_lr` alone keeps the groups
    `model` and `projector`)."""
    part = part_of(name)
    part_lrs = _part_lrs(opt) if part_lrs is None else part_lrs
    if part in part_lrs:
        return part, part_lrs[part]
    if opt.adapter_lr is not None and is_adapter(name):
        return "adapters", opt.adapter_lr
    if part.endswith("_encoder.projector") and opt.projector_lr is not None:
        return "projector", opt.projector_lr
    if part.endswith("_encoder.module") and opt.encoder_lr is not None:
        return "encoder", opt.encoder_lr
    if part == "language_model" and opt.llm_lr is not None:
        return "language_model", opt.llm_lr
    return "model", opt.lr


def param_groups(model: nn.Module, opt: OptimizerSection) -> list[dict]:
    """Trainable parameters split by learning-rate group (`lr_group`: part, adapters, projector...) x
    (decay or not); frozen ones are left out. Each group's `lr` is its peak lr: the scheduler scales every
    group by the same factor, so each part follows the schedule. Raises MmloomError when `part_lr` names
    a part the model does not have."""
    part_lrs = _part_lrs(opt)
    groups: dict[tuple[str, float, bool], list] = {}
    parts = set()
    for name, param in model.named_parameters():
        parts.add(part_of(name))
        if not param.requires_grad:
            continue
        label, lr = lr_group(name, opt, part_lrs)
        groups.setdefault((label, lr, is_no_decay(name, param)), []).append(param)
    unknown = sorted(set(part_lrs) - parts)
    if unknown:
        raise MmloomError(f"optimizer.part_lr names {', '.join(unknown)}, which this model does not have (its parts: "
                          f"{', '.join(sorted(parts))})")
    out = []
    for (label, lr, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": 0.0 if no_decay else opt.weight_decay,
                "group_name": f"{label}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def group_lrs(optimizer) -> dict[str, float]:
    """The current lr of each learning-rate group other than `model` (the decay / no-decay halves of a
    group share it), as `{label}_lr` keys for metrics.jsonl (`projector_lr`, `encoder_lr`, ...)."""
    out = {}
    for group in optimizer.param_groups:
        label = group.get("group_name", "model").removesuffix("_no_decay")
        if label != "model":
            out[f"{label.removesuffix('_lr')}_lr"] = group["lr"]
    return out


def build_optimizer(model: nn.Module, opt: OptimizerSection) -> torch.optim.Optimizer:
    groups = param_groups(model, opt)
    if not groups:
        raise MmloomError("nothing to train: every parameter is frozen (check model.freeze)")
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)


def warmup_steps(schedule: ScheduleSection, total_steps: int) -> int:
    if schedule.warmup_steps is not None:
        return schedule.warmup_steps
    if schedule.warmup_ratio is not None:
        return int(math.ceil(schedule.warmup_ratio * total_steps))
    return 0


def lr_factor(step: int, total_steps: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update made at `step` (0-based), as HF's schedules:
    linear warmup from 0, then cosine/linear decay to `min_ratio` (or constant)."""
    if step < warmup:
        return step / max(1, warmup)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, schedule: ScheduleSection, peak_lr: float, total_steps: int):
    warmup = warmup_steps(schedule, total_steps)
    min_ratio = schedule.min_lr / peak_lr if peak_lr > 0 else 0.0

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, schedule.decay, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_step(scheduler, step: int) -> list[float]:
    """Put a scheduler of `build_scheduler` where it is after `step` optimizer steps (as LambdaLR
    computes it: lr = base_lr x factor(step)), e.g. when a run resumes; returns the learning rates of
    the next update. The schedule is a function of the config and the step only, so a resumed run
    follows its current config's schedule."""
    lrs = [base * factor(step) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    scheduler.last_epoch = step
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return lrs
