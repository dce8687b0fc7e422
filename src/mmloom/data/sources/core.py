"""Shared machinery for dataset converters: context, skips, readers, atomic writes and the run loop."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError


class SkipRecord(Exception):
    """A record that cannot be converted; `reason` is the short key it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Context:
    """What a converter needs: the CLI options plus where images are read from or written to."""

    input: Path
    output: Path
    image_dir: Path | None = None
    split: str = "train"
    strict: bool = False
    image_root: Path = Path(".")  # output image paths are relative to this folder
    write_dir: Path = Path(".")  # where converters that extract images write them
    _written: set[str] = field(default_factory=set)

    @property
    def root(self) -> Path:
        """The dataset folder: --input itself, or the folder holding the --input file."""
        return self.input if self.input.is_dir() else self.input.parent

    def relative(self, path: Path) -> str:
        """`path` relative to the image root, in POSIX form; refuses paths outside it."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.image_root))
        if rel == ".." or rel.startswith(".." + os.sep):
            raise MmloomError(f"image {path} is not under the image root {self.image_root} (see --image-dir)")
        return Path(rel).as_posix()

    def image_ref(self, *candidates: Path) -> str:
        """Relative path of the first candidate that exists on disk; skips the record when none does."""
        for path in candidates:
            if path.is_file():
                return self.relative(path)
        raise SkipRecord("missing_image", f"image not found: {candidates[0]}")

    def save_image(self, rel: str, data: bytes) -> str:
        """Write image bytes to `write_dir/rel` atomically and return the path relative to the image root."""
        if rel in self._written:
            raise SkipRecord("duplicate_image", f"image name {rel!r} already written by an earlier record")
        target = self.write_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as fh:
            fh.write(data)
        self._written.add(rel)
        return self.relative(target)


@dataclass(frozen=True)
class Source:
    """A converter: `read` yields (where, raw item or SkipRecord), `convert` turns a raw item into a record."""

    name: str
    help: str
    read: Callable[[Context], Iterator[tuple[str, Any]]]
    convert: Callable[[Context, Any], dict]
    writes_images: bool = False


@dataclass
class Stats:
    """Counts for the end-of-run summary; `written + sum(skipped.values()) == read`."""

    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)  # reason -> first "where: message"

    def summary(self, name: str, output: Path) -> str:
        lines = [f"{name}: read {self.read}, written {self.written}, "
                 f"skipped {sum(self.skipped.values())} -> {output}"]
        for reason in sorted(self.skipped):
            lines.append(f"  skipped {reason}: {self.skipped[reason]} (first: {self.first[reason]})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- writing


class atomic_open:
    """Open a temp file next to `path`; on a clean exit it replaces `path`, on an error it is removed."""

    def __init__(self, path: Path, mode: str = "w") -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.mode = mode

    def __enter__(self):
        kwargs = {} if "b" in self.mode else {"encoding": "utf-8", "newline": "\n"}
        self.fh = open(self.tmp, self.mode, **kwargs)
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> None:
        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def dump_line(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------- reading


def load_json(path: Path) -> Any:
    """Parse a whole JSON file; errors name the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise MmloomError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise MmloomError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror}") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, object) per non-blank line; a malformed line yields a `bad_json` SkipRecord."""
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{lineno}", SkipRecord("bad_json", f"malformed JSON at column {err.colno}: {err.msg}")
    except UnicodeDecodeError as err:
        raise MmloomError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror}") from None


def json_list(path: Path, key: str | None = None) -> list:
    """Load a JSON list (or the list under `key` of a JSON object), naming the file when it is not one."""
    data = load_json(path)
    if key is not None:
        data = data.get(key) if isinstance(data, dict) else None
    if not isinstance(data, list):
        where = f"a JSON object with a {key!r} list" if key else "a JSON list of records"
        raise MmloomError(f"{path}: expected {where}")
    return data


def find_file(ctx: Context, names: list[str]) -> Path:
    """--input itself when it is a file, else the first of `names` that exists in the --input folder."""
    if ctx.input.is_file():
        return ctx.input
    for name in names:
        if (ctx.input / name).is_file():
            return ctx.input / name
    raise MmloomError(f"{ctx.input}: none of {', '.join(names)} found (check --input and --split)")


def parquet_files(path: Path) -> list[Path]:
    """--input as a parquet file, or the sorted *.parquet files of a folder."""
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise MmloomError(f"{path}: no *.parquet files found")
    return files


def iter_parquet(path: Path, columns: list[str], batch_size: int = 64) -> Iterator[tuple[int, dict]]:
    """Yield (row index, row dict) of the given columns, a few rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise MmloomError(f"{path}: missing parquet column(s) {', '.join(missing)}")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for item in batch.to_pylist():
                yield row, item
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise MmloomError(f"{path}: cannot read parquet: {err}") from None


# ---------------------------------------------------------------------------------------------- records


def text(obj: dict, key: str) -> str:
    """`obj[key]` as a non-empty string (numbers are accepted and stringified)."""
    return as_text(obj[key], key)


def as_text(value: Any, name: str) -> str:
    """`value` as a non-empty string; `name` says what it is in the skip message."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SkipRecord("bad_field", f"{name} is not text: {str(value)[:80]!r}")
    value = str(value)
    if not value.strip():
        raise SkipRecord("missing_field", f"{name} is empty")
    return value


def qa_record(record_id: Any, image: str, question: str, answer: str) -> dict:
    """A single-turn LLaVA record: `<image>\\n` + question, then the answer."""
    return {
        "id": str(record_id),
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ],
    }


def check_image_bytes(data: Any) -> tuple[bytes, str]:
    """Validate encoded image bytes; returns them with the lower-case format name (png, jpeg, ...)."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise SkipRecord("missing_image", "no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "png").lower()
            img.verify()
    except Exception as err:  # PIL raises many types for corrupt data
        raise SkipRecord("bad_image", f"image bytes cannot be decoded ({err})") from None
    return bytes(data), fmt


# ---------------------------------------------------------------------------------------------- run


def run_convert(source: Source, ctx: Context) -> Stats:
    """Convert `ctx.input` with `source` into the jsonl `ctx.output`; returns the counts."""
    if not ctx.input.exists():
        raise MmloomError(f"input not found: {ctx.input}")
    if ctx.output.is_dir():
        raise MmloomError(f"--output {ctx.output} is a folder; give a .jsonl file path")
    if ctx.input.is_file() and ctx.input.resolve() == ctx.output.resolve():
        raise MmloomError(f"--output {ctx.output} would overwrite the input")
    if ctx.image_dir is not None and not source.writes_images and not ctx.image_dir.is_dir():
        raise MmloomError(f"--image-dir {ctx.image_dir} is not a folder")
    if source.writes_images:
        ctx.image_root = ctx.image_dir or ctx.output.parent
        ctx.write_dir = ctx.image_dir or ctx.output.parent / "images"
    else:
        ctx.image_root = ctx.image_dir or ctx.root
    ctx.output.parent.mkdir(parents=True, exist_ok=True)

    stats = Stats()
    with atomic_open(ctx.output, "w") as out:
        for where, raw in source.read(ctx):
            stats.read += 1
            try:
                if isinstance(raw, SkipRecord):
                    raise raw
                record = _convert_one(source, ctx, raw)
            except SkipRecord as skip:
                if ctx.strict:
                    raise MmloomError(f"{where}: {skip.reason}: {skip}") from None
                stats.skipped[skip.reason] += 1
                stats.first.setdefault(skip.reason, f"{where}: {skip}")
                continue
            out.write(dump_line(record))
            stats.written += 1
    return stats


def _convert_one(source: Source, ctx: Context, raw: Any) -> dict:
    """Run `source.convert`, turning lookup and type errors on malformed records into skips."""
    try:
        return source.convert(ctx, raw)
    except KeyError as err:
        raise SkipRecord("missing_field", f"missing field {err.args[0]!r}") from None
    except (TypeError, AttributeError, ValueError, IndexError) as err:
        if isinstance(err, MmloomError):
            raise
        raise SkipRecord("bad_field", f"unexpected value ({err})") from None
