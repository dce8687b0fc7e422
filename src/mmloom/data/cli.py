"""`mmloom data build` and `mmloom data inspect`."""

from __future__ import annotations


def _run_build(args) -> int:
    from mmloom.data.build import build
    from mmloom.data.build_config import load_build_config

    cfg = load_build_config(args.config, args.set)
    build(cfg, strict=args.strict, quiet=args.quiet, overwrite=args.overwrite)
    return 0


def _run_inspect(args) -> int:
    from mmloom.data.inspect import run_inspect

    return run_inspect(args)


def register(data_subparsers) -> None:
    p = data_subparsers.add_parser(
        "build",
        help="tokenize LLaVA jsonl records into the Cerebras HDF5 layout",
        description="Build .h5 training files + data_params.json from LLaVA jsonl records. "
        "Bad records are skipped and counted by reason (or stop the build with --strict).",
    )
    p.add_argument("config", help="build config YAML (setup / processor / dataset sections)")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad record (file:line and reason)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a config key, e.g. --set setup.processes=8 (repeatable)",
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
    q.add_argument("file", help="an .h5 file written by `mmloom data build`")
    q.add_argument("--index", type=int, default=0, help="sample index inside the file (default 0)")
    q.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: processor.tokenizer_type of data_params.json next to the file)",
    )
    q.add_argument("--plain", action="store_true", help="no colours: mark supervised spans with [[...]]")
    q.set_defaults(func=_run_inspect)
