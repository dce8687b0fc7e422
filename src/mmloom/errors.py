"""Errors that mmloom raises on bad user input (the CLI prints them without a traceback)."""

from __future__ import annotations


class MmloomError(ValueError):
    """Base class for errors about user input or files; the message says what and where."""
