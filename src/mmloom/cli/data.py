"""`mmloom data ...`: dataset conversion, HDF5 building and inspection."""

from __future__ import annotations

import importlib

# Modules that add sub-commands under `mmloom data`; each defines `register(data_subparsers)`.
DATA_COMMAND_MODULES = [
    "mmloom.data.cli",
    "mmloom.data.sources.cli",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="convert datasets, build and inspect HDF5 training data")
    data_sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help())
    for name in DATA_COMMAND_MODULES:
        importlib.import_module(name).register(data_sub)
