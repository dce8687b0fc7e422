"""Atomic, resumable training checkpoints that work with one process, DDP and FSDP2.

`MODEL_DIR/checkpoint-N/` is an mmloom model folder (config.json + safetensors; trainable
weights only by default) plus
- the processor files (`mmloom_processor.json`, tokenizer, image transform), as with final_model,
- `optimizer.pt`: the full (unsharded) optimizer state keyed by parameter names,
- `trainer_state.json`: step, scheduler state, data position, frozen-weight fingerprint, ...,
- `rng_state_R.pt`: each rank's python / numpy / torch RNG states,
- `run_config.yaml`: the run's resolved training config (trainable-only checkpoints), from which
  :func:`load_saved_model` rebuilds the frozen weights when no base model is given.
It is written into a temporary folder and renamed (atomic); all ranks take part in gathering
the full state dicts, rank 0 writes.

:func:`load_saved_model` loads any of them for inference, conversion or merging: a full save as it
is; a trainable-only checkpoint on `base` (PEFT adapters applied as recorded), or, without `base`, on
the starting model its run config describes (checked against the recorded frozen-weight fingerprint).
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
RUN_CONFIG = "run_config.yaml"
RESOLVED_CONFIG = "resolved_config.yaml"  # written by the trainer into MODEL_DIR


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
    processor=None,
) -> Path:
    """Save `checkpoint-{step}` atomically (collective: every rank must call it). `processor` (a
    MultimodalProcessor) is saved with it so that chat / generate / convert can use the folder."""
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
            if processor is not None:
                processor.save_pretrained(tmp)
            if trainable_only and (Path(model_dir) / RESOLVED_CONFIG).exists():
                shutil.copyfile(Path(model_dir) / RESOLVED_CONFIG, tmp / RUN_CONFIG)
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


def _run_config_path(folder: Path) -> Path | None:
    for path in (folder / RUN_CONFIG, folder.parent / RESOLVED_CONFIG):
        if path.exists():
            return path
    return None


def load_saved_model(folder: str | Path, base=None, torch_dtype=None, device=None):
    """A saved mmloom model (eval mode) from a model folder, a checkpoint or a run folder (its
    final_model, else its latest checkpoint), for chat, generate, convert and merge-lora.

    A trainable-only checkpoint loads on `base` (a full model folder or a MultimodalModel; PEFT specs
    recorded in the checkpoint are applied to it); without `base`, on the starting model rebuilt from
    the checkpoint's run config (`run_config.yaml`, else the run folder's resolved config), which must
    give the frozen-weight fingerprint the run recorded. Raises MmloomError otherwise."""
    from mmloom.model.multimodal import MultimodalConfig, MultimodalModel
    from mmloom.training import builder
    from mmloom.training.config import load_train_config

    folder = builder.resolve_weights_folder(folder)
    config = MultimodalConfig.load(folder)
    if not config.trainable_only or base is not None:
        return MultimodalModel.from_pretrained(folder, torch_dtype=torch_dtype, base=base, device=device)
    run_config = _run_config_path(folder)
    if run_config is None:
        raise MmloomError(
            f"{folder} holds trainable weights only and no run config to rebuild the others from; "
            "give the full model it was trained on as the base (e.g. --base DIR)"
        )
    cfg = load_train_config(run_config)
    start = None
    if cfg.runconfig.checkpoint_path is not None:
        start = builder.resolve_weights_folder(cfg.runconfig.checkpoint_path)
        if start.resolve() == folder.resolve():
            raise MmloomError(f"{folder}: its run config names the checkpoint itself as the starting model")
    model = builder.build_starting_model(cfg, start)
    recorded = read_trainer_state(folder).get("frozen_fingerprint") if (folder / TRAINER_STATE).exists() else None
    if recorded and recorded != builder.frozen_fingerprint(model):
        raise MmloomError(
            f"{folder} holds trainable weights only, and the frozen weights rebuilt from {run_config} differ from "
            "those the run trained with (changed model folders or config?); give the right base model (--base DIR)"
        )
    model.load_weights(ser.load_state_dict(folder), tied_weights=config.tied_weights, strict=False)
    dtype = config.torch_dtype if torch_dtype is None else torch_dtype
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model.to(device)
    return model.eval()
