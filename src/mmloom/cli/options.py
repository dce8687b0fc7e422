"""What every `mmloom` command shares at its boundary: the argument parser (one-line usage errors,
help that states each option's default) and the option value types that refuse bad values before
any work starts (negative counts, missing folders, files of the wrong kind).

Each type is an `argparse` `type=` callable: it returns the converted value or raises
`argparse.ArgumentTypeError`, which the parser reports as
`mmloom COMMAND: error: argument --NAME: MESSAGE` (exit 2, no traceback).
"""

from __future__ import annotations

import argparse
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default
    (`(default: X)`) unless the help already states one, or the default is None / False / SUPPRESS
    (nothing to state: the option is off or taken from elsewhere, which its help says)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
            or default == []
        ):
            return text
        return f"{text} (default: {default})".lstrip()


class UsageError(Exception):
    """A command line that does not parse; `str()` is the one line to print (`mmloom.cli.main`
    prints it and exits 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `HelpFormatter` and one-line usage errors:
    `mmloom chat: error: argument --max-new-tokens: must be at least 1, got -1 (see mmloom chat --help)`,
    raised as `UsageError`. Sub-command parsers made with `add_subparsers().add_parser` are of this
    class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def positive_int(value: str) -> int:
    """A count of at least 1 (batch sizes, new tokens, strides, multiples)."""
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """A count or index of at least 0 (worker processes, sample indices, seeds)."""
    number = _int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def non_negative_float(value: str) -> float:
    """A finite number of at least 0 (sampling temperature: 0 = greedy)."""
    number = _float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def existing_dir(value: str) -> str:
    """A folder that exists (inputs); the path is returned as given."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"folder not found: {value}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder")
    return value


def existing_file(value: str) -> str:
    """A file that exists (inputs); the path is returned as given."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {value}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    return value
