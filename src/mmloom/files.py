"""Reading and writing mmloom's small files: JSON documents and atomic writes.

Every write goes to a temporary sibling first and is renamed onto its target (`os.replace`,
atomic on POSIX), so a killed process leaves either the old file/folder or the new one, never a
half-written one. The temporary file or folder gets the mode the process umask gives a new one
(`mkstemp`'s 0600 and `mkdtemp`'s 0700 would otherwise survive the rename), so a team's other
accounts read what mmloom writes exactly as they read the user's own files. Every JSON read names
the file in its error; a JSON file is read only up to `MAX_JSON_BYTES` and a nesting depth Python
can parse (deeper is a `bad_json` error, not a RecursionError).
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
MAX_JSON_BYTES = 256 * 2**20  # mmloom's own JSON files and users' (configs, params, indexes) are far smaller


def process_umask() -> int:
    """The umask of this process (Linux: read from /proc without changing it; elsewhere set and
    restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 with umask 022)."""
    return 0o666 & ~process_umask()


def folder_mode() -> int:
    """The mode a new folder gets under the process umask (0o755 with umask 022)."""
    return 0o777 & ~process_umask()


def apply_umask(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes the process umask gives new files and folders
    (executable files stay executable). For a folder mmloom has just written whole: libraries it
    calls write some files 0600 (safetensors' temporary-file-and-rename, for one)."""
    mask = process_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


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


def read_json(path: str | os.PathLike, expect: type | None = dict, hint: str = "",
              max_bytes: int | None = MAX_JSON_BYTES) -> Any:
    """The JSON document in `path` (a leading UTF-8 BOM is ignored): mmloom's own files and users'.

    Raises MmloomError naming the file when it is missing, unreadable or larger than `max_bytes`
    (None: no limit), and JsonFileError when it is not UTF-8 (the first bad byte named), not JSON
    (line and column named), nested deeper than Python's parser goes, or not of type `expect`
    (None: any type); `hint` is appended to the message (what to do about it).
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes and path.is_file():
            raise MmloomError(f"{path}: {mib(size)}, more than a JSON file of this kind may hold ({mib(max_bytes)})"
                              f"{suffix}")
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
    except RecursionError:
        raise JsonFileError("bad_json", f"{path}: JSON nested too deeply to read{suffix}") from None
    if expect is not None and not isinstance(value, expect):
        raise JsonFileError("bad_json", f"{path}: expected a JSON {expect.__name__}, got {type(value).__name__}{suffix}")
    return value


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would survive the rename
    finally:
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
        return self.tmp  # its mode and its files' follow the umask before the rename (`apply_umask`)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            apply_umask(self.tmp)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
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
