"""Reading and writing mmloom's small files: JSON documents and atomic writes.

Every write goes to a temporary sibling first and is renamed onto its target (`os.replace`,
atomic on POSIX), so a killed process leaves either the old file/folder or the new one, never a
half-written one. Every JSON read names the file in its error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError


def read_json(path: str | os.PathLike, expect: type = dict, hint: str = "") -> Any:
    """The JSON document in `path` (a UTF-8 BOM is accepted).

    Raises MmloomError naming the file when it is missing, unreadable, not JSON or not of type
    `expect` (None: any type); `hint` is appended to the message (what to do about it).
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise MmloomError(f"{path} not found{suffix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MmloomError(f"{path}: not a readable JSON file ({exc}){suffix}") from None
    if expect is not None and not isinstance(data, expect):
        raise MmloomError(f"{path}: expected a JSON {expect.__name__}, got {type(data).__name__}{suffix}")
    return data


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> None:
    """Write `data` as indented UTF-8 JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


class atomic_directory:
    """Write into a temporary sibling folder, then rename it onto `target` (replacing it)."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
