"""AdamW parameter groups (no decay on biases and norms, projector lr) and lr schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.training.config import OptimizerSection, ScheduleSection

_NORM_RE = re.compile(r"(norm|ln_|layernorm|layer_norm)", re.IGNORECASE)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-d parameters get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or bool(_NORM_RE.search(name))


def is_projector(name: str) -> bool:
    return ".projector." in f".{name}"


def param_groups(model: nn.Module, opt: OptimizerSection) -> list[dict]:
    """Trainable parameters split by (projector or not) x (decay or not); frozen ones are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (is_projector(name), is_no_decay(name, param))
        groups.setdefault(key, []).append(param)
    out = []
    for (projector, no_decay), params in sorted(groups.items()):
        lr = opt.projector_lr if (projector and opt.projector_lr is not None) else opt.lr
        out.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": 0.0 if no_decay else opt.weight_decay,
                "group_name": f"{'projector' if projector else 'model'}{'_no_decay' if no_decay else ''}",
            }
        )
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
