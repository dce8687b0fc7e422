"""`mmloom demo`: the whole pipeline, end to end, on synthetic scenes (what `make demo` runs)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the LLaVA pipeline end to end on synthetic scenes (data, tokenizer, HDF5, 2 phases, eval)",
        description="Generates a synthetic scene dataset, trains a tokenizer, builds HDF5 data, trains phase 1 "
        "and phase 2, evaluates on held-out scenes with and without the images, and chats. Each step "
        "is a printed `mmloom` command. Everything is written under --out.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (cleared if a previous demo made it)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for smoke tests)")
    parser.set_defaults(func=_demo)


def _demo(args) -> int:
    from mmloom.demo.pipeline import run_demo

    run_demo(args.out, quick=args.quick)
    return 0
