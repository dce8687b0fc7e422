"""`mmloom train`, `mmloom plot` and `mmloom merge-lora`."""

from __future__ import annotations

import argparse
import os
import sys

from mmloom.cli.options import existing_dir


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
    p.add_argument("config", help="training YAML (train_input, eval_input, model, optimizer, schedule, runconfig; "
                   "see configs/llava_v1p5/ and configs/tiny/)")
    p.add_argument("--model-dir", required=True, help="run folder: checkpoints, metrics, final_model (created; "
                   "a run resumes from its latest checkpoint)")
    p.add_argument("--mode", choices=["train", "eval", "train_and_eval"], default="train",
                   help="train; eval (eval_input loss, perplexity, next-token accuracy of the latest weights); or both")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=1e-4 (repeatable); VALUE is YAML, "
                   "null unsets a key: --set runconfig.num_epochs=null --set runconfig.max_steps=1000 trains "
                   "by steps instead of epochs (default: the config as written)")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("plot", help="plot loss and learning-rate curves of a run (PNG)",
                              description="Write loss.png and lr.png from MODEL_DIR/metrics.jsonl.")
    p.add_argument("model_dir", type=existing_dir, help="run folder of `mmloom train` (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: MODEL_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace loss.png / lr.png of an earlier `mmloom plot`")
    p.set_defaults(func=_plot)

    p = subparsers.add_parser("merge-lora", help="fold LoRA adapters into the weights: a plain mmloom model folder",
                              description="Fold the LoRA adapters of a trained model (every adapted part: the LLM "
                              "and encoders) into its weights and write a plain mmloom model folder (with the "
                              "processor files). An adapter on a tied embedding (lm_head of Qwen2, Gemma, "
                              "Llama-3.2, SmolLM) is merged exactly: the head gets its own weight.")
    p.add_argument("model_dir", type=existing_dir,
                   help="mmloom model folder, checkpoint-N folder or run folder (uses its final_model)")
    p.add_argument("out_dir", help="the merged model folder: new or empty (written atomically, model and processor "
                   "together; never inside MODEL_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it is an earlier `mmloom merge-lora` "
                   "output")
    p.set_defaults(func=_merge)


def _train(args: argparse.Namespace) -> int:
    from mmloom.training.config import load_train_config
    from mmloom.training.distributed import init_distributed
    from mmloom.training.preemption import TrainingStopped
    from mmloom.training.run_folder import RunFolder

    cfg = load_train_config(args.config, args.overrides)
    warn_single_process(cfg.runconfig.distributed)
    try:
        ctx = init_distributed(cfg.runconfig.distributed)
    except RuntimeError as err:  # the process group could not form (port in use, a rank missing, timeout)
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            raise
        return distributed_failure(err, int(os.environ.get("RANK", "0") or 0), world_size)
    try:
        with RunFolder(args.model_dir).lock(ctx, args.mode):  # before the trainer's imports: a refusal is quick
            from mmloom.training.loop import run_training

            run_training(cfg, args.model_dir, mode=args.mode, ctx=ctx, lock=False)
            # every rank done (the first one's final save included) before any tears the process group down:
            # a rank that left early made a peer abort in gloo's teardown now and then (SIGABRT, exit code 1)
            ctx.barrier()
    except TrainingStopped as stop:  # SIGTERM / Ctrl-C: a checkpoint was saved; 128 + the signal number
        if ctx.is_main:
            print(f"mmloom train: {stop}", file=sys.stderr)
        return stop.exit_code
    except RuntimeError as err:
        if ctx.world_size <= 1:
            raise
        return distributed_failure(err, ctx.rank, ctx.world_size)
    finally:
        ctx.shutdown()
    return 0


# Known distributed failures: (text in torch's message, what it means for the user)
DISTRIBUTED_HINTS = (
    ("Expected to have finished reduction", "DDP found trainable parameters that took no part in the loss of a step: "
     "set runconfig.find_unused_parameters: true"),
    ("Connection closed by peer", "another rank stopped (see its own error above, or the launcher's)"),
    ("Connection reset by peer", "another rank stopped (see its own error above, or the launcher's)"),
    ("Broken pipe", "another rank stopped (see its own error above, or the launcher's)"),
    ("Timed out", "the ranks waited too long for each other (a rank stalled or stopped)"),
    ("address already in use", "the rendezvous port is taken: another run uses it (torchrun --master-port=...)"),
)


def distributed_failure(err: BaseException, rank: int, world_size: int) -> int:
    """Report a failure of a distributed run as one line on this rank's stderr (the launcher reports
    which ranks failed); returns the exit code, 1. Torch's multi-line messages and tracebacks are cut
    to their first line, with a hint for the failures users meet."""
    text = str(err).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    hint = next((meaning for needle, meaning in DISTRIBUTED_HINTS if needle.lower() in text.lower()), None)
    if hint:
        sentence = first.split(". ")[0].rstrip(".")
        detail = f"{hint} ({type(err).__name__}: {sentence[:200]})"
    else:
        detail = f"{type(err).__name__}: {first[:300]}"
    print(f"mmloom train: error on rank {rank} of {world_size}: {detail}", file=sys.stderr, flush=True)
    return 1


def warn_single_process(mode: str, environ=os.environ) -> bool:
    """Say so (one line on stderr) when `runconfig.distributed` asks for ddp/fsdp but the command
    was not launched by torchrun with several processes: the run then trains as one process on one
    device (nothing sharded). Returns whether it warned."""
    if mode in ("ddp", "fsdp") and int(environ.get("WORLD_SIZE", "1") or 1) <= 1:
        print(f"mmloom train: warning: runconfig.distributed is {mode!r} but this is a single process "
              "(WORLD_SIZE unset or 1): training runs on one device, nothing is distributed; launch with "
              "`torchrun --nproc_per_node=N -m mmloom train ...` for several", file=sys.stderr)
        return True
    return False


def _plot(args: argparse.Namespace) -> int:
    from mmloom.training.plot import plot_metrics

    for path in plot_metrics(args.model_dir, args.out, overwrite=args.overwrite):
        print(path)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from mmloom.interop.common import merge_lora

    _, merged = merge_lora(args.model_dir, args.out_dir, overwrite=args.overwrite)
    print(f"merged the LoRA adapters of: {'; '.join(merged)}")
    print(f"merged model written to {args.out_dir}")
    return 0
