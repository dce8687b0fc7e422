"""Reading and writing mmloom's small files: JSON documents and atomic writes.

Every write goes to a temporary sibling first and is renamed onto its target (`os.replace`,
atomic on POSIX), so a killed process leaves either the old file/folder or the new one, never a
half-written one. Every JSON read names the file in its error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError

BOM = b"\xef\xbb\xbf"


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` is a full disk, an exceeded quota or file-size limit: an OSError with one of
    those errnos, or a library's error whose text carries it (h5py reports HDF5's `errno = 28`)."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    text = str(err)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system of `path` (or its nearest existing parent); -1 when unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def mib(n: float) -> str:
    """A byte count as MiB for messages, e.g. "12.5 MiB"."""
    return f"{n / 2**20:,.1f} MiB"


class JsonFileError(MmloomError):
    """A whole JSON file is unusable; ``reason`` is ``bad_json`` (malformed, or not the expected
    type) or ``bad_encoding`` (not UTF-8)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_json(path: str | os.PathLike, expect: type | None = dict, hint: str = "") -> Any:
    """The JSON document in `path` (a leading UTF-8 BOM is ignored): mmloom's own files and users'.

    Raises MmloomError naming the file when it is missing or unreadable, and JsonFileError when it
    is not UTF-8 (the first bad byte named), not JSON (line and column named) or not of type
    `expect` (None: any type); `hint` is appended to the message (what to do about it).
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        data = path.read_bytes().removeprefix(BOM)
    except FileNotFoundError:
        raise MmloomError(f"{path} not found{suffix}") from None
    except IsADirectoryError:
        raise MmloomError(f"{path}: is a folder, not a JSON file{suffix}") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror or err}{suffix}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonFileError("bad_encoding", f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x}){suffix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise JsonFileError(
            "bad_json", f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}{suffix}"
        ) from None
    if expect is not None and not isinstance(value, expect):
        raise JsonFileError("bad_json", f"{path}: expected a JSON {expect.__name__}, got {type(value).__name__}{suffix}")
    return value


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """`open()` a temporary file next to `path` ("w": UTF-8 text with "\\n" newlines, "wb": bytes);
    on a clean exit it replaces `path`, on an error it is removed."""
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    with atomic_file(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


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


FINGERPRINT_BLOCK = 64 * 1024  # bytes read at each sampled offset
FINGERPRINT_BLOCKS = 16  # offsets sampled per file (evenly spaced, the last one ending at the file's end)


def files_fingerprint(paths: list[str | os.PathLike]) -> str:
    """A sha256 over each file's name, size and contents: files up to FINGERPRINT_BLOCKS blocks are read
    whole, larger ones at FINGERPRINT_BLOCKS evenly spaced blocks (so a 10 GB weights file costs 1 MiB of
    reading). A rebuilt or replaced file almost always changes it; an edit confined to bytes between the
    sampled blocks of a large file does not. Raises OSError for an unreadable file."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= FINGERPRINT_BLOCK * FINGERPRINT_BLOCKS:
                digest.update(f.read())
                continue
            step = (size - FINGERPRINT_BLOCK) / (FINGERPRINT_BLOCKS - 1)
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(int(k * step))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()
