"""Data already in LLaVA form (LLaVA-Pretrain, llava_v1_5_mix665k, ShareGPT4V): validate and write jsonl."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmloom.data.records_io import SkipRecord, iter_records, relative_media_path
from mmloom.data.sources.core import Context, Source, Stats, dump_line
from mmloom.errors import MmloomError
from mmloom.files import atomic_open


def _llava_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if not ctx.input.is_file():
        raise MmloomError(f"{ctx.input}: expected a LLaVA .json (list) or .jsonl file")
    yield from iter_records(ctx.input)


def validate_llava(record: Any) -> None:
    """Raise SkipRecord unless `record` is a LLaVA record: a non-empty `conversations` list of {from, value}.

    An ``image`` must be a relative path that stays under the image root (else ``bad_image_path``).
    """
    if not isinstance(record, dict):
        raise SkipRecord("bad_field", "record is not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("missing_field", "missing or empty 'conversations' list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise SkipRecord("bad_field", f"conversations[{i}] is not an object with string 'from' and 'value'")
    image = record.get("image")
    if image is not None:
        if not (isinstance(image, str) and image):
            raise SkipRecord("bad_field", "'image' is not a non-empty string")
        relative_media_path(image)


def _llava_convert(ctx: Context, record: Any) -> dict:
    validate_llava(record)
    if ctx.image_dir is not None and "image" in record and not (ctx.image_dir / record["image"]).is_file():
        raise SkipRecord("missing_image", f"image not found: {ctx.image_dir / record['image']}")
    return record


SOURCE = Source("llava", "LLaVA .json list or .jsonl file (image paths kept; checked under --image-dir if given)",
                _llava_read, _llava_convert)


@dataclass
class FileResult:
    """One `json_to_jsonl` file: its output and counts, or the error that kept it from being written."""

    source: Path
    target: Path
    stats: Stats
    error: str | None = None


def json_to_jsonl(in_dir: Path, out_dir: Path) -> list[FileResult]:
    """Write each ``in_dir/*.json`` (a JSON list of records) as ``out_dir/<name>.jsonl``, records unchanged.

    As Cerebras' ``convert_json2jsonl``, but a BOM is ignored, a record holding bytes that are not
    UTF-8 is skipped and counted (``bad_encoding``, named by file, index and line), and a file that
    is not a JSON list, is malformed, or keeps no record is not written: its `error` says why.
    The other files are still converted; each output is written atomically.

    Raises:
        MmloomError: `in_dir` is not a folder or holds no ``*.json`` file.
    """
    if not in_dir.is_dir():
        raise MmloomError(f"{in_dir}: not a folder")
    files = sorted(in_dir.glob("*.json"))
    if not files:
        raise MmloomError(f"{in_dir}: no *.json files found")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        result = FileResult(path, out_dir / f"{path.stem}.jsonl", Stats())
        stats = result.stats
        try:
            with atomic_open(result.target, "w") as out:
                for where, record in iter_records(path, "json"):
                    stats.read += 1
                    try:
                        if isinstance(record, SkipRecord):
                            raise record
                        out.write(dump_line(record))
                    except SkipRecord as skip:
                        stats.skip(where, skip)
                        continue
                    stats.written += 1
                if stats.written == 0:
                    raise stats.nothing_written("json2jsonl", path, result.target)
        except MmloomError as err:
            result.error = str(err)
        results.append(result)
    return results
