"""Shared machinery for dataset converters: context and image lookup, skips, atomic writes and the run loop.

Reading JSON / jsonl files (BOM, encoding errors, list or object) lives in :mod:`mmloom.data.records_io`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mmloom.data.records_io import SkipRecord, relative_media_path
from mmloom.errors import MmloomError
from mmloom.files import atomic_open

IMAGE_NAME_HINT = "images in another folder? give it with --image-dir"




@dataclass
class Context:
    """What a converter needs: the CLI options plus where images are read from or written to.

    `image_root` is the folder every output image path is relative to (--image-dir, else the
    dataset root, or the output folder for sources that write images); `write_dir` is where those
    sources write them.
    """

    input: Path
    output: Path
    image_dir: Path | None = None
    split: str | None = None  # None: the source's default split
    strict: bool = False
    options: str = "inline"  # multiple-choice layout: "inline" (Cerebras) or "newline"
    prompts: str = "brief"  # synthdog questions: "brief" (LLaVA / Cerebras) or "ocr"
    seed: int = 0  # seed of the synthdog prompt draw
    image_root: Path = Path(".")
    write_dir: Path = Path(".")
    _written: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the bytes written this run

    @property
    def root(self) -> Path:
        """The dataset folder: --input itself, or the folder holding the --input file."""
        return self.input if self.input.is_dir() else self.input.parent

    def split_or(self, default: str, choices: tuple[str, ...] | None = None, source: str = "") -> str:
        """--split, or `default` when it was not given; refuses a split outside `choices` (when given)."""
        split = self.split or default
        if choices is not None and split not in choices:
            raise MmloomError(f"{source}: --split must be one of {', '.join(choices)}, not {split!r}")
        return split

    def _under_root(self, path: Path) -> str | None:
        """`path` relative to the image root in POSIX form, or None when it lies outside it."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.image_root))
        if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
            return None
        return Path(rel).as_posix()

    def relative(self, path: Path) -> str:
        """`path` relative to the image root, in POSIX form; a path outside it is a user error."""
        rel = self._under_root(path)
        if rel is None:
            raise MmloomError(f"image {path} is not under the image root {self.image_root} (see --image-dir)")
        return rel

    def find_image(self, name: Any, *layout: str | Path, field: str = "image") -> str:
        """Find a record's image on disk and return its path relative to the image root.

        `name` is the record's image path (checked by :func:`relative_media_path`); `layout` are the places
        the dataset's own layout keeps it, relative to the dataset root or absolute (default: `name`).
        With --image-dir, ``image_dir/name`` and ``image_dir/<file name>`` are tried next, so both
        an ancestor of the dataset and a flat image folder (the official DocVQA downloads) work.
        A file found outside the image root is not used.

        Raises:
            SkipRecord: ``bad_image_path`` (the name leaves the root), ``missing_image`` (not found
                under the image root; the places tried are named).
        """
        name = relative_media_path(name, field)
        candidates = [self.root / rel for rel in (layout or (name,))]
        if self.image_dir is not None:
            candidates += [self.image_dir / name, self.image_dir / PurePosixPath(name).name]
        candidates = list(dict.fromkeys(candidates))
        outside = None
        for path in candidates:
            if path.is_file():
                rel = self._under_root(path)
                if rel is not None:
                    return rel
                outside = outside or path
        if outside is not None:
            raise SkipRecord("missing_image", f"image {outside} is not under the image root {self.image_root} "
                                              "(--image-dir)")
        tried = ", ".join(str(p) for p in candidates[:3])
        hint = "" if self.image_dir is not None else f" ({IMAGE_NAME_HINT})"
        raise SkipRecord("missing_image", f"image {name!r} not found (tried {tried}){hint}")

    def save_image(self, name: str, data: bytes) -> str:
        """Write image bytes to ``write_dir/name`` atomically; returns the path relative to the image root.

        An existing file is never replaced: identical bytes are reused (re-runs are idempotent);
        different bytes under a name this run already wrote skip the record (``duplicate_image``),
        and different bytes in a file from elsewhere (another run, dataset or version) stop the
        run with an MmloomError naming the file.
        """
        name = relative_media_path(name)
        digest = hashlib.sha256(data).hexdigest()
        target = self.write_dir / name
        if name in self._written:
            if self._written[name] != digest:
                raise SkipRecord("duplicate_image", f"image name {name!r} already written by an earlier record "
                                                    "with other content")
            return self.relative(target)
        already = target.exists() or not _write_new(target, data)
        if already and (not target.is_file() or _file_digest(target) != digest):
            raise MmloomError(
                f"{target} already exists with other content (from another run or dataset?); it is not "
                "overwritten: convert into another --image-dir, or remove the old images first")
        self._written[name] = digest
        return self.relative(target)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_new(target: Path, data: bytes) -> bool:
    """Write `data` to a temp file and publish it as `target` only if no `target` exists (hard link).

    Returns False when `target` appeared meanwhile (e.g. a parallel run), which is then left as is.
    Where hard links are not supported the temp file is renamed over `target` instead.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Source:
    """A converter: `read` yields (where, raw item or SkipRecord), `convert` turns a raw item into a record."""

    name: str
    help: str
    read: Callable[[Context], Iterator[tuple[str, Any]]]
    convert: Callable[[Context, Any], dict]
    writes_images: bool = False
    has_splits: bool = False  # whether --split applies


@dataclass
class Stats:
    """Counts for the end-of-run summary; `written + sum(skipped.values()) == read`."""

    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)  # reason -> first "where: message"

    def skip(self, where: str, skip: SkipRecord) -> None:
        """Count one skipped record; the first of each reason is kept for the summary."""
        self.skipped[skip.reason] += 1
        self.first.setdefault(skip.reason, f"{where}: {skip}")

    def reasons(self) -> list[str]:
        """One ``skipped REASON: N (first: where: message)`` line per reason, sorted by reason."""
        return [f"  skipped {reason}: {self.skipped[reason]} (first: {self.first[reason]})"
                for reason in sorted(self.skipped)]

    def summary(self, name: str, output: Path) -> str:
        lines = [f"{name}: read {self.read}, written {self.written}, "
                 f"skipped {sum(self.skipped.values())} -> {output}"]
        return "\n".join(lines + self.reasons())

    def nothing_written(self, name: str, source: Path, output: Path) -> MmloomError:
        """The error for a conversion that kept no record: what was read and why each was skipped."""
        if self.read == 0:
            return MmloomError(f"{name}: no records found in {source}; {output} not written")
        return MmloomError("\n".join([f"{name}: 0 of {self.read} records written from {source}; {output} not "
                                      "written. Skip reasons:", *self.reasons()]))


# ---------------------------------------------------------------------------------------------- writing


def dump_line(record: Any) -> str:
    """`record` as one jsonl line (non-ASCII kept as is).

    Raises SkipRecord ``bad_encoding`` when the record holds text that cannot be written as UTF-8:
    bytes that were not UTF-8 in the input (see :mod:`mmloom.data.records_io`) or an escaped lone
    surrogate such as ``"\\udc80"``.
    """
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(line[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise SkipRecord("bad_encoding", f"text that is not UTF-8 ({what})") from None
    return line


# ---------------------------------------------------------------------------------------------- reading


def find_file(ctx: Context, names: list[str], subdirs: tuple[str, ...] = ()) -> Path:
    """--input itself when it is a file, else the first of `names` in the --input folder or its `subdirs`."""
    if ctx.input.is_file():
        return ctx.input
    for folder in (ctx.input, *(ctx.input / d for d in subdirs)):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    where = ", ".join([str(ctx.input), *(f"{d}/" for d in subdirs)])
    raise MmloomError(f"{ctx.input}: none of {', '.join(names)} found in {where} (check --input and --split)")


def parquet_files(path: Path) -> list[Path]:
    """--input as a parquet file, or the sorted *.parquet files of a folder (or of its data/, as HF dataset repos)."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
    if not files:
        raise MmloomError(f"{path}: no *.parquet files found (nor in {path / 'data'})")
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


def with_options(question: str, options: list[str], layout: str) -> str:
    """A multiple-choice prompt: ``Q a) x b) y`` (``"inline"``, Cerebras' preprocess_dataset.py) or one per line."""
    return "\n".join([question, *options]) if layout == "newline" else " ".join([question, *options])


def decode_image_bytes(data: Any):
    """Fully decode encoded image bytes (PNG, JPEG, ...) into a loaded PIL image.

    Decoding the whole image (not only ``verify()``) catches files cut short after an intact header.

    Raises:
        SkipRecord: ``missing_image`` (no bytes), ``image_too_large`` (more pixels than the budget,
            `mmloom.processing.image.MAX_IMAGE_PIXELS`, read from the header before decoding) or
            ``bad_image`` (not an image, truncated, corrupt).
    """
    from PIL import Image

    from mmloom.processing.image import check_pixel_budget
    from mmloom.processing.media_spec import MediaError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise SkipRecord("missing_image", "no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixel_budget(img, "image bytes")
            img.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
    except MediaError as err:  # image_too_large: over the pixel budget
        raise SkipRecord(err.reason, err.detail) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise SkipRecord("bad_image", f"image bytes cannot be decoded ({err or type(err).__name__})") from None
    return img


def check_image_bytes(data: Any) -> tuple[bytes, str]:
    """Validate encoded image bytes by decoding them; returns them with the lower-case format name (png, jpeg, ...)."""
    img = decode_image_bytes(data)
    return bytes(data), (img.format or "png").lower()


# ---------------------------------------------------------------------------------------------- run


def run_convert(source: Source, ctx: Context) -> Stats:
    """Convert `ctx.input` with `source` into the jsonl `ctx.output`; returns the counts.

    Bad records are counted by reason (or, with ``ctx.strict``, stop the run). The output is
    written atomically and only when at least one record is kept.

    Raises:
        MmloomError: bad arguments, an unreadable input, a strict-mode skip, or no record written
            (the message lists the skip reasons; an existing output is left as it was).
    """
    if not ctx.input.exists():
        raise MmloomError(f"input not found: {ctx.input}")
    if ctx.output.is_dir():
        raise MmloomError(f"--output {ctx.output} is a folder; give a .jsonl file path")
    if ctx.input.is_file() and ctx.input.resolve() == ctx.output.resolve():
        raise MmloomError(f"--output {ctx.output} would overwrite the input")
    if ctx.image_dir is not None and not source.writes_images and not ctx.image_dir.is_dir():
        raise MmloomError(f"--image-dir {ctx.image_dir} is not a folder")
    if ctx.split is not None and not source.has_splits:
        raise MmloomError(f"{source.name} has no splits: --split does not apply (the whole input is converted)")
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
                line = dump_line(_convert_one(source, ctx, raw))
            except SkipRecord as skip:
                if ctx.strict:
                    raise MmloomError(f"{where}: {skip.reason}: {skip}") from None
                stats.skip(where, skip)
                continue
            out.write(line)
            stats.written += 1
        if stats.written == 0:
            raise stats.nothing_written(source.name, ctx.input, ctx.output)
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
