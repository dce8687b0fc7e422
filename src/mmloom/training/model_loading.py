"""Every saved or configured model through one loader: the base model a run starts from, the model
at a checkpoint, and any saved model for inference, conversion and merging.

**The base model** (PEFT's word, and the `--base` option's) is the model a run starts from: the
configured parts (`model.image_model` / `model.encoders` + `model.text_model`, or `model.init_from`)
built from the run's seed, the weights of `runconfig.checkpoint_path` (:func:`base_folder`; a PEFT
folder's after LoRA is added), frozen as configured, LoRA added (`model.lora`). A trainable-only
checkpoint holds the difference from it, and records a fingerprint of its frozen weights
(:func:`frozen_fingerprint`) so that the base rebuilt later is checked to be the one the run trained on.

- :func:`build_base_model`: the base model, on the meta device first and filled from the first rank
  (the trainer's start-up, one process or many);
- :func:`model_at`: the base model with a checkpoint's weights (a resumed run, `data cache-features`);
- :func:`load_model`: any saved model in eval mode (a model folder, `checkpoint-N` or a run folder;
  a trainable-only one on a given base, else on the base its run config describes), for `chat`,
  `generate`, `convert` and `merge-lora`.

It sits in `training` because a trainable-only checkpoint is rebuilt from its run config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.adapters import add_lora, has_adapters
from mmloom.model.meta_init import (
    SafetensorsReader,
    detach_values,
    materialize,
    mmloom_folder_sources,
    placeholders,
)
from mmloom.model.multimodal import MultimodalConfig, MultimodalModel
from mmloom.training.builder import StartPlan, build_model
from mmloom.training.config import TrainConfig, load_train_config
from mmloom.training.distributed import (
    DistContext,
    apply_fsdp,
    broadcast_rng_state,
    gather_rows,
    load_from_rank0,
    unwrap,
)
from mmloom.training.run_folder import RESOLVED_CONFIG, RUN_CONFIG, TRAINER_STATE, resolve_model_folder


def base_folder(cfg: TrainConfig) -> Path | None:
    """The mmloom model folder whose weights the base model takes: `runconfig.checkpoint_path`
    resolved (a model folder, a checkpoint, or a run folder's final_model / newest checkpoint); None
    when it is not set. Raises MmloomError when the path holds no model."""
    path = cfg.runconfig.checkpoint_path
    return resolve_model_folder(path) if path is not None else None


def build_base_model(cfg: TrainConfig, folder: Path | None = None, ctx: DistContext | None = None,
                     wrap: bool = False) -> nn.Module:
    """The base model of `cfg`: built from the config and seed, `folder`'s weights loaded (a PEFT
    folder after LoRA is added; :func:`base_folder` gives the run's), frozen as configured, on
    `ctx.device`, in train mode.

    The model is built on the meta device (`builder.StartPlan`: no process holds weights it does not
    need), then allocated and filled one tensor at a time: the first rank reads each pretrained or
    start tensor from its safetensors file, or takes the value it built (random parts: the same
    values and random state as a one-process build), and hands it to every rank. With `wrap` the
    model is readied for training under `ctx`: gradient checkpointing as configured, then FSDP2
    (each block sharded while still on the meta device, so a rank allocates only its shards: its
    host memory at start-up is its shard plus the tensor in flight, plus, on the first rank, the
    parts with random weights). Under DDP every rank holds the same model (the first one reads it),
    returned unwrapped: the trainer wraps it (`Trainer.wrap_ddp`) once a micro-batch shows which
    parameters get gradients. Returns the FSDP2-wrapped model or the composite (`distributed.unwrap`
    gives the composite either way). Collective when `ctx` is distributed. Raises MmloomError for
    weights that do not fit the configured model."""
    ctx = ctx or DistContext()
    plan = StartPlan(values_here=ctx.is_main)
    model = build_model(cfg, seed=cfg.runconfig.seed, plan=plan)
    folder_has_adapters = folder is not None and has_adapters(folder)
    if folder is not None and not folder_has_adapters:
        plan.load_folder(model, folder)
    if cfg.model.freeze:
        model.freeze(cfg.model.freeze)
    if cfg.model.lora is not None:
        with placeholders(model) if plan.values_here else contextlib.nullcontext():
            add_lora(model, cfg.model.lora)  # adapters with values where the random parts are built
    if folder_has_adapters:
        plan.load_folder(model, folder)
    broadcast_rng_state(ctx)  # every rank continues from the random state of a one-process build
    if ctx.is_main:
        for note in plan.notes:
            print(f"note: {note}")
    model.train()
    sharded = wrap and ctx.distributed and ctx.mode == "fsdp"
    if wrap and cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sources = plan.sources.by_name(model)
    values = detach_values(model) if sharded else {}  # FSDP2 shards meta tensors only
    if not ctx.is_main:
        values.clear()  # only the first rank's values are handed out
    if sharded:
        apply_fsdp(model, cfg.model.precision)
    materialize(model, ctx.device)

    def value(name: str, target: torch.Tensor) -> torch.Tensor | None:
        if name in sources:
            values.pop(name, None)
            return reader.read(sources[name], target.dtype)
        return values.pop(name, None)  # None: the tensor holds its value already

    with SafetensorsReader() as reader:
        load_from_rank0(model, ctx, value)
    return model


def load_weights(model, folder: str | Path, ctx: DistContext | None = None) -> int:
    """Load the weights of an mmloom model folder (full or trainable-only) into `model` (plain,
    DDP-wrapped or FSDP2-sharded), one tensor at a time: the first rank reads each tensor and hands it
    out (the rows of each rank's shard under FSDP2, the whole tensor otherwise). Collective when
    `ctx` is distributed. Returns the number of tensors loaded. Raises MmloomError for tensors
    `model` lacks or whose shapes differ (before any is loaded)."""
    base = unwrap(model)
    sources = mmloom_folder_sources(folder, base)
    ctx = ctx or DistContext()
    with SafetensorsReader() as reader:
        load_from_rank0(base, ctx, lambda name, target: reader.read(sources[name], target.dtype), set(sources))
    return len(sources)


def frozen_fingerprint(model, ctx: DistContext | None = None) -> str:
    """A cheap fingerprint of the frozen parameters (trainable-only checkpoints rely on them): the
    sum and the absolute sum of each whole tensor, accumulated in float64 on the CPU. The shards of
    an FSDP2 model are gathered on the first rank one tensor at a time, which computes the
    fingerprint and gives it to every rank (collective; `ctx` is needed then)."""
    ctx = ctx or DistContext()
    sharded = any(hasattr(p, "device_mesh") for p in model.parameters())
    total, absolute, count = 0.0, 0.0, 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                continue
            t, gathered = p.detach(), hasattr(p, "device_mesh")
            if gathered:
                t = gather_rows(t, ctx, torch.float64) if ctx.distributed else t.full_tensor()
                if t is None:  # not the first rank
                    continue
            t = t.to("cpu", torch.float64, copy=not gathered)  # summed in float64 as the checkpoints recorded
            total += float(t.sum())
            absolute += float(t.abs_().sum())
            count += t.numel()
            del t
    fingerprint = f"{count}:{total:.10e}:{absolute:.10e}"
    return ctx.broadcast_object(fingerprint) if sharded and ctx.distributed else fingerprint


def check_frozen_weights(checkpoint: Path, fingerprint: str, built_from: str, hint: str = "") -> None:
    """Refuse (MmloomError naming `checkpoint` and `built_from`, with `hint`) a trainable-only
    checkpoint whose recorded frozen-weight fingerprint differs from `fingerprint` (the base model's):
    its weights would land on other frozen weights than those the run trained with."""
    from mmloom.training.checkpoint import read_trainer_state

    state = read_trainer_state(checkpoint) if (Path(checkpoint) / TRAINER_STATE).exists() else {}
    recorded = state.get("frozen_fingerprint")
    if recorded and recorded != fingerprint and MultimodalConfig.load(checkpoint).trainable_only:
        raise MmloomError(
            f"{checkpoint} holds trainable weights only, and the frozen weights built from {built_from} differ from "
            f"those the run trained with (changed model folders, config, seed or start weights?){hint}"
        )


def model_at(cfg: TrainConfig, checkpoint: Path | None, folder: Path | None = None, ctx: DistContext | None = None,
             wrap: bool = False, built_from: str = "this config", hint: str = "") -> tuple[nn.Module, str]:
    """(model, fingerprint): the base model (:func:`build_base_model` with `folder`'s weights, `wrap`
    as there) and, with `checkpoint`, that checkpoint's weights on it; the fingerprint is the base
    model's frozen weights' (:func:`frozen_fingerprint`, what the run's checkpoints record). Collective
    when `ctx` is distributed. Raises MmloomError when the checkpoint is trainable-only and was trained
    on other frozen weights (:func:`check_frozen_weights`), or its weights do not fit."""
    ctx = ctx or DistContext()
    model = build_base_model(cfg, folder, ctx, wrap=wrap)
    fingerprint = frozen_fingerprint(unwrap(model), ctx)
    if checkpoint is not None:
        check_frozen_weights(checkpoint, fingerprint, built_from, hint)
        load_weights(unwrap(model), checkpoint, ctx)
    return model, fingerprint


def run_config_path(folder: Path) -> Path | None:
    """The run config a checkpoint's base is rebuilt from: its own `run_config.yaml`, else its run
    folder's `resolved_config.yaml`; None when there is neither."""
    for path in (folder / RUN_CONFIG, folder.parent / RESOLVED_CONFIG):
        if path.exists():
            return path
    return None


def load_model(path: str | Path, base: str | Path | MultimodalModel | None = None, dtype=None,
               device=None) -> MultimodalModel:
    """A saved mmloom model in eval mode, from a model folder, a `checkpoint-N` or a run folder (its
    final_model, else its newest complete checkpoint), for chat, generate, convert and merge-lora.

    A full save loads as it is (in its saved dtype unless `dtype` says otherwise, on `device`). A
    trainable-only checkpoint loads on `base` (a full model folder or a MultimodalModel; PEFT specs
    recorded in the checkpoint are applied to it); without `base`, on the base model rebuilt from the
    checkpoint's run config (`run_config.yaml`, else the run folder's resolved config: :func:`model_at`),
    which must give the frozen-weight fingerprint the run recorded. Raises MmloomError otherwise."""
    folder = resolve_model_folder(path)
    config = MultimodalConfig.load(folder)
    if not config.trainable_only or base is not None:
        return MultimodalModel.from_pretrained(folder, torch_dtype=dtype, base=base, device=device)
    run_config = run_config_path(folder)
    if run_config is None:
        raise MmloomError(
            f"{folder} holds trainable weights only and no run config to rebuild the others from; "
            "give the full model it was trained on as the base (e.g. --base DIR)"
        )
    cfg = load_train_config(run_config)
    start = base_folder(cfg)
    if start is not None and start.resolve() == folder.resolve():
        raise MmloomError(f"{folder}: its run config names the checkpoint itself as the starting model")
    model, _ = model_at(cfg, folder, start, built_from=str(run_config), hint="; give the right base model (--base DIR)")
    dtype = config.torch_dtype if dtype is None else dtype
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model.to(device)
    return model.eval()
