"""`mmloom data ...`: dataset conversion (`convert`, `json2jsonl`), `build`, `inspect` and `cache-features`.

Heavy imports (torch, transformers) happen inside the command functions, so `mmloom --help` stays fast.
"""

from __future__ import annotations

from mmloom.cli import data_sources
from mmloom.cli.options import existing_dir, existing_file, non_negative_int, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="convert datasets, build and inspect HDF5 training data",
                                   description="Dataset commands: convert, json2jsonl, build, inspect, cache-features "
                                   "(mmloom data DATA_COMMAND --help for each).")
    data_sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help())
    register_commands(data_sub)
    data_sources.register(data_sub)  # convert, json2jsonl


def _run_build(args) -> int:
    from mmloom.data.build import build
    from mmloom.data.build_config import load_build_config

    cfg = load_build_config(args.config, args.set)
    build(cfg, strict=args.strict, quiet=args.quiet, overwrite=args.overwrite)
    return 0


def _run_inspect(args) -> int:
    import sys

    from rich.console import Console

    from mmloom.data.inspect import inspect_sample

    markup = sys.stdout.isatty() and not getattr(args, "plain", False)
    text = inspect_sample(args.file, args.index, args.tokenizer, markup=markup)
    if markup:
        Console().print(text, highlight=False)
    else:
        print(text)
    return 0


def _run_cache_features(args) -> int:
    from mmloom.training.config import load_train_config
    from mmloom.training.data import cache_features

    cfg = load_train_config(args.config, args.set)
    summary = cache_features(
        cfg, model_dir=args.model_dir, batch_size=args.batch_size, device=args.device,
        num_workers=args.num_workers, overwrite=args.overwrite, progress=False if args.quiet else None,
    )
    if not args.quiet:
        rate = f", {summary['images_per_s']} images/s" if summary["images_per_s"] else ""
        print(
            f"feature cache {summary['cache_dir']}: {len(summary['written'])} file(s) written, "
            f"{summary['up_to_date']} up to date; {summary['images_encoded']} images encoded in "
            f"{summary['seconds']:.1f} s{rate}; features {tuple(summary['feature_shape'])} float16, "
            f"{summary['bytes'] / 2**20:.1f} MiB"
        )
    return 0


def register_commands(data_subparsers) -> None:
    """`build`, `inspect` and `cache-features`."""
    p = data_subparsers.add_parser(
        "build",
        help="tokenize LLaVA jsonl records into the Cerebras HDF5 layout",
        description="Build .h5 training files + data_params.json from LLaVA jsonl records. "
        "Bad records are skipped and counted by reason (or stop the build with --strict).",
    )
    p.add_argument("config", help="build config YAML (setup / processor / dataset sections; see "
                   "configs/data/*.yaml); relative paths in it are relative to the current folder")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad record (file:line and reason)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a config key, e.g. --set setup.processes=8 (repeatable; VALUE is YAML, null unsets; default: the config as written)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the .h5 files already in setup.output_dir"
    )
    p.set_defaults(func=_run_build)

    q = data_subparsers.add_parser(
        "inspect",
        help="print one sample of an .h5 file: text, supervised spans, image slots",
        description="Decode one sample; supervised tokens are highlighted (or shown as [[...]] when not a TTY).",
    )
    q.add_argument("file", type=existing_file, help="an .h5 file written by `mmloom data build`")
    q.add_argument("--index", type=non_negative_int, default=0, help="sample index inside the file (default 0)")
    q.add_argument(
        "--tokenizer",
        default=None,
        type=existing_dir,
        help="tokenizer folder (default: processor.tokenizer_type of data_params.json next to the file)",
    )
    q.add_argument("--plain", action="store_true", help="no colours: mark supervised spans with [[...]]")
    q.set_defaults(func=_run_inspect)

    c = data_subparsers.add_parser(
        "cache-features",
        help="precompute a FROZEN vision encoder's features for training (phase 1) without images",
        description="Run the vision encoder that a training config builds (same weights, feature selection, "
        "image size, transforms and precision) once over every sample with an image of train_input, and "
        "store the selected features in float16 in train_input.feature_cache_dir (default "
        "DATA_DIR/feature_cache/features-*.h5, one per data file). Train from them with "
        "--set train_input.use_cached_features=true. ONLY VALID FOR A FROZEN VISION ENCODER (model.freeze "
        "matching ^image_model, as in LLaVA phase 1): the command and the trainer refuse a trainable encoder, "
        "and the trainer refuses a cache whose encoder weights or settings differ from the run's. Files "
        "already up to date are skipped, so an interrupted run continues where it stopped.",
    )
    c.add_argument("config", help="training YAML (the one `mmloom train` takes)")
    c.add_argument("--model-dir", default=None,
                   help="run folder of `mmloom train`: if it holds checkpoints, take the weights a resumed run would "
                   "(default: the weights the run starts from)")
    c.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder forward (default 32)")
    c.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda if available, "
                   "else cpu)")
    c.add_argument("--num-workers", type=non_negative_int, default=None,
                   help="image decoding processes (default: train_input.num_workers)")
    c.add_argument("--overwrite", action="store_true", help="recompute files that are already up to date")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a training config key, e.g. --set train_input.data_dir=... (repeatable; "
                   "default: the config as written)")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    c.set_defaults(func=_run_cache_features)
