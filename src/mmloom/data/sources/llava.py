"""Data already in LLaVA form (LLaVA-Pretrain, llava_v1_5_mix665k, ShareGPT4V): validate and write jsonl."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmloom.data.sources.core import (
    Context,
    SkipRecord,
    Source,
    atomic_open,
    dump_line,
    iter_jsonl,
    json_list,
)
from mmloom.errors import MmloomError


def _is_json_list(path: Path) -> bool:
    """True when the file's first non-blank character is `[` (a JSON list), else it is read as jsonl."""
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def _llava_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if not ctx.input.is_file():
        raise MmloomError(f"{ctx.input}: expected a LLaVA .json (list) or .jsonl file")
    if _is_json_list(ctx.input):
        for i, item in enumerate(json_list(ctx.input)):
            yield f"{ctx.input}[{i}]", item
    else:
        yield from iter_jsonl(ctx.input)


def validate_llava(record: Any) -> None:
    """Raise SkipRecord unless `record` is a LLaVA record: a non-empty `conversations` list of {from, value}."""
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
    if image is not None and not (isinstance(image, str) and image):
        raise SkipRecord("bad_field", "'image' is not a non-empty string")


def _llava_convert(ctx: Context, record: Any) -> dict:
    validate_llava(record)
    if ctx.image_dir is not None and "image" in record and not (ctx.image_dir / record["image"]).is_file():
        raise SkipRecord("missing_image", f"image not found: {ctx.image_dir / record['image']}")
    return record


SOURCE = Source("llava", "LLaVA .json list or .jsonl file (image paths kept; checked under --image-dir if given)",
                _llava_read, _llava_convert)


def json_to_jsonl(in_dir: Path, out_dir: Path) -> list[tuple[Path, int]]:
    """Write each `in_dir/*.json` (a JSON list) as `out_dir/<name>.jsonl`; returns (output, record count)."""
    if not in_dir.is_dir():
        raise MmloomError(f"{in_dir}: not a folder")
    files = sorted(in_dir.glob("*.json"))
    if not files:
        raise MmloomError(f"{in_dir}: no *.json files found")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for path in files:
        records = json_list(path)
        target = out_dir / f"{path.stem}.jsonl"
        with atomic_open(target, "w") as out:
            for record in records:
                out.write(dump_line(record))
        done.append((target, len(records)))
    return done
