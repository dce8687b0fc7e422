"""Parquet datasets that carry their images as bytes: ArxivCap and SynthDoG; images are written out."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mmloom.data.sources.core import (
    Context,
    SkipRecord,
    Source,
    check_image_bytes,
    iter_parquet,
    parquet_files,
    qa_record,
    text,
)

# ---------------------------------------------------------------------------------------------- ArxivCap

ARXIVCAP_QUESTION = "Create a caption for the provided figure."


def _arxivcap_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    for path in parquet_files(ctx.input):
        for row, item in iter_parquet(path, ["caption_images"]):
            entries = item["caption_images"]
            if not isinstance(entries, list):
                yield f"{path} row {row}", SkipRecord("missing_field", "caption_images is not a list")
                continue
            for j, entry in enumerate(entries):
                yield f"{path} row {row} figure {j}", (path, row, j, entry)


def _safe_name(name: Any) -> str | None:
    """A relative POSIX path built from `name`, without absolute parts or `..`; None if nothing is left."""
    if not isinstance(name, str):
        return None
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    return "/".join(parts) or None


def _arxivcap_convert(ctx: Context, raw: tuple[Path, int, int, dict]) -> dict:
    path, row, j, entry = raw
    pairs = entry["cil_pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise SkipRecord("missing_image", "no cil_pairs")
    if len(pairs) > 1:
        raise SkipRecord("multi_figure", f"{len(pairs)} figures (only single-figure captions are kept)")
    caption = text(entry, "caption")
    pair = pairs[0]
    image = pair["image"] or {}
    data, fmt = check_image_bytes(image.get("bytes"))
    name = _safe_name(pair.get("image_file")) or _safe_name(image.get("path"))
    name = name or f"{path.stem}/{row:07d}_{j}.{'jpg' if fmt == 'jpeg' else fmt}"
    ref = ctx.save_image(name, data)
    return qa_record(PurePosixPath(name).with_suffix("").as_posix(), ref, ARXIVCAP_QUESTION, caption)


# ---------------------------------------------------------------------------------------------- SynthDoG

SYNTHDOG_QUESTIONS = [
    "Read the text in the image.",
    "What text is written in this image?",
    "Transcribe the text shown in the image.",
    "Write out all the text in the image.",
    "What does the text in this image say?",
    "Extract the text from the image.",
    "Provide the full text written in the image.",
    "Copy the text that appears in the image.",
]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthdog_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    index = 0
    for path in parquet_files(ctx.input):
        for row, item in iter_parquet(path, ["image", "ground_truth"]):
            yield f"{path} row {row}", (index, item)
            index += 1


def _as_png(data: bytes) -> bytes:
    if data.startswith(_PNG_SIGNATURE):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue()


def _synthdog_convert(ctx: Context, raw: tuple[int, dict]) -> dict:
    index, item = raw
    truth = item["ground_truth"]
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except json.JSONDecodeError as err:
            raise SkipRecord("bad_field", f"ground_truth is not valid JSON ({err.msg})") from None
    answer = text(truth["gt_parse"], "text_sequence")
    data, _ = check_image_bytes((item["image"] or {}).get("bytes"))
    record_id = f"{index:08d}"
    ref = ctx.save_image(f"{record_id}.png", _as_png(data))
    question = random.Random(index).choice(SYNTHDOG_QUESTIONS)
    return qa_record(record_id, ref, question, answer)


SOURCES = [
    Source("arxivcap", "ArxivCap parquet file or folder of *.parquet (single-figure captions; writes images)",
           _arxivcap_read, _arxivcap_convert, writes_images=True),
    Source("synthdog", "SynthDoG parquet file or folder of *.parquet (image, ground_truth; writes PNG images)",
           _synthdog_read, _synthdog_convert, writes_images=True),
]
