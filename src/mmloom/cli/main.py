"""`mmloom` entry point: one sub-command module per concern, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from mmloom import __version__
from mmloom.cli.options import ArgumentParser, UsageError
from mmloom.errors import MmloomError

# Each module defines `register(subparsers)`, adding its sub-command(s) with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "mmloom.cli.data",
    "mmloom.cli.train",
    "mmloom.cli.convert",
    "mmloom.cli.infer",
    "mmloom.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="mmloom",
        description="Build, train and convert multimodal LLMs from HuggingFace parts (LLaVA-1.5 recipe).",
    )
    parser.add_argument("--version", action="version", version=f"mmloom {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
MAX_ERROR_CHARS = 2000  # an error line quoting a huge input is cut here


def capped(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: ")


def error_text(err: BaseException) -> str:
    """The message of `err` without the worker traceback that torch's DataLoader wraps around an
    error raised in a data-loader worker (`num_workers > 0`): `Caught MmloomError in DataLoader worker
    process 0. Original Traceback ...` becomes the original message, as with `num_workers: 0`."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[i]):
            return "\n".join([_EXCEPTION_LINE.sub("", lines[i], count=1), *lines[i + 1:]])
    return lines[-1]


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the flush at exit cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:  # a bad option value or a missing argument: one line, exit 2
        print(err, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except MmloomError as err:
        print(f"mmloom {args.command}: error: {capped(error_text(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        _silence_stdout()
        return 0
    except OSError as err:  # unreadable input, unwritable output, full disk: one clear line
        print(capped(f"mmloom {args.command}: error: {err.strerror or error_text(err)}: {err.filename or ''}".rstrip(": ")),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
