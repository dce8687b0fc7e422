"""Atomic, resumable training checkpoints that work with one process, DDP and FSDP2.

`MODEL_DIR/checkpoint-N/` is an mmloom model folder (config.json + safetensors; trainable
weights only by default) plus
- `optimizer.pt`: the full (unsharded) optimizer state keyed by parameter names,
- `trainer_state.json`: step, scheduler state, data position, frozen-weight fingerprint, ...,
- `rng_state_R.pt`: each rank's python / numpy / torch RNG states.
It is written into a temporary folder and renamed (atomic); all ranks take part in gathering
the full state dicts, rank 0 writes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import read_json
from mmloom.model import serialization as ser
from mmloom.training.builder import list_checkpoints
from mmloom.training.distributed import DistContext, unwrap

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (on rank 0; other ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not ctx.distributed:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else {}


def full_optimizer_state(model: nn.Module, optimizer, ctx: DistContext) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else {}


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(full_state_dict=True))


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_model_folder(directory: Path, model: nn.Module, state: dict[str, torch.Tensor], trainable_only: bool) -> None:
    """Write an mmloom model folder (config.json + safetensors) from an already gathered state dict."""
    base = unwrap(model)
    config = base.config
    config.torch_dtype = "float32"
    if trainable_only:
        trainable = {n for n, p in base.named_parameters() if p.requires_grad}
        state = {n: t for n, t in state.items() if n in trainable}
    state, config.tied_weights = ser.dedupe_shared_tensors(state)
    config.trainable_only = trainable_only
    config.save(directory)
    ser.save_state_dict(state, directory)


def save_checkpoint(
    model_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    trainable_only: bool = True,
    keep_last: int | None = None,
) -> Path:
    """Save `checkpoint-{step}` atomically (collective: every rank must call it)."""
    state = full_model_state(model, ctx)
    optim_state = full_optimizer_state(model, optimizer, ctx)
    rngs = ctx.gather_objects(rng_state())
    target = Path(model_dir) / f"checkpoint-{step}"
    if ctx.is_main:
        with ser.atomic_directory(target) as tmp:
            write_model_folder(tmp, model, state, trainable_only)
            torch.save(optim_state, tmp / OPTIMIZER_STATE)
            for r, s in enumerate(rngs):
                torch.save(s, tmp / f"rng_state_{r}.pt")
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        if keep_last is not None:
            for _, old in list_checkpoints(model_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return target


def read_trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.exists():
        raise MmloomError(f"{folder} is not a training checkpoint (no {TRAINER_STATE}); "
                          "use runconfig.load_checkpoint_states: model")
    return read_json(path, hint="the checkpoint is damaged")


def load_training_state(folder: Path, model: nn.Module, optimizer, scheduler, ctx: DistContext) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG from a checkpoint (after the weights)."""
    folder = Path(folder)
    state = read_trainer_state(folder)
    optim_path = folder / OPTIMIZER_STATE
    if optim_path.exists():
        load_optimizer_state(model, optimizer, torch.load(optim_path, map_location="cpu", weights_only=True))
    if state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    rng_path = folder / f"rng_state_{ctx.rank}.pt"
    if rng_path.exists():
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return state
