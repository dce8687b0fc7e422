"""`mmloom train`, `mmloom plot` and `mmloom merge-lora`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train / evaluate a LLaVA-style model from a YAML config (torchrun for several processes)",
        description="Train or evaluate from a YAML config. Resumes automatically from the newest complete "
        "checkpoint in --model-dir (damaged ones are skipped with a note; runconfig.resume_weights_only: true "
        "continues from a checkpoint whose optimizer/RNG state is missing). SIGTERM or Ctrl-C: a checkpoint at "
        "the next step boundary, then exit code 128 + the signal number (143, 130). Distributed: torchrun "
        "--nproc_per_node=N -m mmloom train ... with runconfig.distributed: ddp|fsdp.",
    )
    p.add_argument("config", help="training YAML (train_input, eval_input, model, optimizer, schedule, runconfig)")
    p.add_argument("--model-dir", required=True, help="run folder: checkpoints, metrics, final_model")
    p.add_argument("--mode", choices=["train", "eval", "train_and_eval"], default="train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=1e-4 (repeatable)")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("plot", help="plot loss and learning-rate curves of a run (PNG)")
    p.add_argument("model_dir")
    p.add_argument("--out", default=None, help="output folder (default: MODEL_DIR)")
    p.set_defaults(func=_plot)

    p = subparsers.add_parser("merge-lora", help="fold LoRA adapters into the LLM: a plain mmloom model folder")
    p.add_argument("model_dir", help="mmloom model folder or run folder (uses its final_model)")
    p.add_argument("out_dir")
    p.set_defaults(func=_merge)


def _train(args: argparse.Namespace) -> int:
    from mmloom.training.config import load_train_config
    from mmloom.training.distributed import init_distributed
    from mmloom.training.loop import run_training
    from mmloom.training.preemption import TrainingStopped

    cfg = load_train_config(args.config, args.overrides)
    ctx = init_distributed(cfg.runconfig.distributed)
    try:
        run_training(cfg, args.model_dir, mode=args.mode, ctx=ctx)
    except TrainingStopped as stop:  # SIGTERM / Ctrl-C: a checkpoint was saved; 128 + the signal number
        if ctx.is_main:
            print(f"mmloom train: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        ctx.shutdown()
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mmloom.training.plot import plot_metrics

    for path in plot_metrics(args.model_dir, args.out):
        print(path)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from mmloom.training.lora import merge_lora

    merge_lora(args.model_dir, args.out_dir)
    print(f"merged model written to {args.out_dir}")
    return 0
