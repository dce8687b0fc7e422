"""Where commands write: nothing of the user's is replaced, one writer per output folder.

Every command that writes a folder or a file at a path the user gives (`convert`, `init`,
`merge-lora`, `data build`, `plot --out`, `score --output-json`) claims it first with
:func:`check_destination`:

- a destination that is a source of the command, lies inside one or contains one is refused
  (replacing it would delete the source);
- a destination that does not exist, or is an empty folder, is written;
- a destination that exists and is not empty is refused in one line, unless it is the same
  command's own earlier output (a folder holding the `.mmloom-output.json` marker that command
  wrote, or what the command recognises as its own) and the user passes `--overwrite`.

Folders are then written with :func:`new_folder`: into a temporary sibling, verified, the marker
added, then swapped into place (the old folder renamed aside, the new one renamed in, the old one
removed): a killed command leaves the old folder or the complete new one. A full disk (or a quota)
is one line naming the destination and the bytes it needs, with nothing of it kept.

Output folders that are filled over a long time (a `data build` output, a training run folder)
have one writer at a time: :class:`FolderLock` takes an `flock` on `FOLDER/.mmloom.lock`, which
the kernel releases when the process ends, however it ends. A second writer is refused in one line
naming the holder (its command, PID and host); readers (`mmloom train --mode eval`) share the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.files import atomic_directory, free_bytes, is_disk_full, mib, read_json, write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, folders are not locked
    fcntl = None

MARKER = ".mmloom-output.json"
LOCK_NAME = ".mmloom.lock"


class DestinationError(MmloomError):
    """A destination a command refuses to write (it exists and is not the command's own output, or
    it holds / lies inside a source)."""


class OutputWriteError(MmloomError):
    """An output could not be written (full disk, quota); nothing of it was kept."""


# ----------------------------------------------------------------------------------- claiming
def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def marker_command(folder: Path) -> str | None:
    """The command recorded in `folder`'s output marker (e.g. ``"convert"``), None without one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        value = read_json(path, max_bytes=2**16).get("command")
    except MmloomError:
        return None
    return value if isinstance(value, str) else None


def _contents(folder: Path) -> list[str]:
    """The names in `folder` other than mmloom's lock file and output marker."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, MARKER))


def _entries(folder: Path, limit: int = 4) -> str:
    names = _contents(folder)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_destination(
    dst: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike | None] = (),
    kind: str = "folder",
    recognise: Callable[[Path], bool] | None = None,
) -> bool:
    """Claim `dst` for `command` (``"convert"``, ``"merge-lora"``, ``"data build"``, ...): a
    ``"folder"`` or a ``"file"`` (`kind`). Returns True when `dst` holds the command's own earlier
    output that `overwrite` allows replacing, False when there is nothing to replace (absent, or an
    empty folder).

    Own earlier output: a folder with the marker `command` wrote, or what `recognise(dst)` accepts.
    Raises DestinationError (one line) when `dst` is, holds or lies inside one of `sources`; when it
    is a file where a folder goes (or the reverse); when it exists, is not empty and is not the
    command's own output; and when it is the command's own output without `overwrite`.
    """
    dst = Path(dst)
    where = dst.resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if where == src:
            raise DestinationError(f"the destination {dst} is the source; write to a new {kind}")
        if _inside(where, src):
            raise DestinationError(f"the destination {dst} lies inside the source {source}; write it elsewhere")
        if _inside(src, where):
            raise DestinationError(f"the destination {dst} contains the source {source}: writing it would replace "
                                   f"the source; give a new {kind}")
    if not dst.exists() and not dst.is_symlink():
        return False
    flag = f"mmloom {command}"
    if kind == "folder":
        if not dst.is_dir():
            raise DestinationError(f"the destination {dst} is an existing file, not a folder; give a new folder "
                                   "(nothing was written)")
        if not _contents(dst):  # empty, or what a command that stopped early left: its lock, its marker
            return False
        own = marker_command(dst) == command or (recognise is not None and recognise(dst))
        if not own:
            raise DestinationError(f"the destination {dst} exists and holds files `{flag}` did not write "
                                   f"({_entries(dst)}); give a new or empty folder (nothing was written)")
    else:
        if dst.is_dir():
            raise DestinationError(f"the destination {dst} is an existing folder, not a file; give a new file path")
        if recognise is None or not recognise(dst):
            raise DestinationError(f"the destination {dst} exists and is not an earlier output of `{flag}`; "
                                   "give a new file path (nothing was written)")
    if not overwrite:
        raise DestinationError(f"the destination {dst} holds an earlier output of `{flag}`; pass --overwrite to "
                               "replace it, or give a new path")
    return True


# ------------------------------------------------------------------------------------ writing
def disk_full_error(path: str | os.PathLike, err: BaseException | None = None, needed: int | None = None,
                    kept: str = "nothing of it was kept") -> OutputWriteError:
    """The one-line error for a write of `path` that ran out of space: the path, the bytes it
    needs (when known), the bytes free, and what was kept."""
    free = max(free_bytes(Path(path).parent), 0)
    need = f"it needs about {mib(needed)}, " if needed else ""
    what = "no space left on the device" if err is None or is_disk_full(err) else (
        getattr(err, "strerror", None) or str(err).splitlines()[0][:200])
    return OutputWriteError(f"cannot write {path}: {what} ({need}{mib(free)} free); {kept}")


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, needed: int | None = None,
                       kept: str = "nothing of it was kept") -> Iterator[None]:
    """Turn a full disk (an OSError, or a library's error that says so, such as the tokenizers
    library's plain `Exception`) inside the block into :func:`disk_full_error` for `path`."""
    try:
        yield
    except MmloomError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(path, err, needed, kept) from None
        raise


@contextlib.contextmanager
def new_folder(dst: str | os.PathLike, command: str, needed: int | None = None,
               verify: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst` to write `command`'s output into; on a clean exit
    `verify(tmp)` (a problem, or None) is checked, the output marker written and the folder swapped
    into place (replacing what :func:`check_destination` allowed). On an error nothing is kept; a
    full disk is one OutputWriteError naming `dst` and `needed` bytes (also refused up front when
    fewer bytes are free)."""
    dst = Path(dst)
    free = free_bytes(dst.parent)
    if needed and 0 <= free < needed:
        raise disk_full_error(dst, None, needed, "nothing was written")
    with disk_full_as_error(dst, needed), atomic_directory(dst) as tmp:
        yield tmp
        if verify is not None and (problem := verify(tmp)):
            raise OutputWriteError(f"cannot write {dst}: {problem}; nothing of it was kept")
        write_marker(tmp, command)


def write_marker(folder: Path, command: str) -> None:
    """Mark `folder` as the output of `mmloom COMMAND` (what :func:`check_destination` recognises)."""
    write_json(Path(folder) / MARKER, {"written_by": "mmloom", "command": command})


# ------------------------------------------------------------------------------------ locking
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """A forked child (a build worker, a data-loader worker) does not keep its parent's locks: if
    it outlived a parent killed with -9, the folder would stay locked."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class FolderInUse(MmloomError):
    """Another process holds the lock of a folder this command writes."""


class FolderLock:
    """An `flock` on `FOLDER/.mmloom.lock` (created with the folder): exclusive for the one writer,
    shared for readers. The kernel drops it when the process ends, however it ends (kill -9, OOM);
    the file is removed by the last holder on a clean release. `what` names the folder in messages
    (e.g. ``"run folder"``).

    Raises FolderInUse from :meth:`acquire` when another process holds a conflicting lock, naming
    its command, PID and host (recorded in the file by an exclusive holder; readers are listed from
    /proc/locks where the system has it)."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", shared: bool = False,
                 hint: str = "wait for that process to finish, or use another folder"):
        self.folder = Path(folder)
        self.hint = hint
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        if fcntl is None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise MmloomError(f"the {self.what} {self.folder} is an existing file, not a folder") from None
        except OSError as err:
            raise MmloomError(f"cannot create the {self.what} {self.folder}: {err.strerror or err}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise MmloomError(f"cannot lock the {self.what} {self.folder}: {err.strerror or err} "
                                  f"({self.path})") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                message = self._refusal(fd)
                os.close(fd)
                raise FolderInUse(message) from None
            # a holder that released in the meantime removed the file: lock the one at the path now
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD.add(fd)
        os.ftruncate(fd, 0)  # what an earlier holder recorded (one killed with -9 leaves the file) is gone
        if not self.shared:
            info = {"command": " ".join(["mmloom", *sys.argv[1:]])[:300], "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(fd)
        try:
            last = True
            if self.shared:  # the last reader removes the file; others keep it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    last = False
            if last:
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, fd: int) -> str:
        holder = _read_holder(fd)
        readers = [] if holder else _flock_pids(os.fstat(fd).st_ino)
        if holder:
            who = (f"`{holder.get('command', 'mmloom')}` (PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"since {holder.get('since', '?')})")
        elif readers:
            who = f"a reader such as `mmloom train --mode eval` (PID {', '.join(map(str, readers))} on this host)"
        else:
            who = "another process"
        return f"the {self.what} {self.folder} is in use by {who}; it has one writer at a time: {self.hint}"


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        info = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _flock_pids(inode: int) -> list[int]:
    """PIDs holding an flock on the file with `inode` (Linux /proc/locks; [] elsewhere)."""
    pids = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        return []
    return sorted(set(pids))
