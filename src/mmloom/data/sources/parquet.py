"""Parquet datasets that carry their images as bytes: ArxivCap and SynthDoG; images are written out."""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mmloom.data.records_io import SkipRecord, relative_media_path
from mmloom.data.sources.core import (
    Context,
    Source,
    check_image_bytes,
    decode_image_bytes,
    iter_parquet,
    parquet_files,
    qa_record,
    text,
)
from mmloom.errors import MmloomError

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
    given = pair.get("image_file") or image.get("path")
    if given:
        name = relative_media_path(given, "image_file")  # "2101.00001/fig1.png"; a path leaving the root is skipped
    else:  # no file name in the parquet: one unique per source file, row and figure
        name = f"{path.stem}/{row:07d}_{j}.{'jpg' if fmt == 'jpeg' else fmt}"
    ref = ctx.save_image(name, data)
    return qa_record(PurePosixPath(name).with_suffix("").as_posix(), ref, ARXIVCAP_QUESTION, caption)


# ---------------------------------------------------------------------------------------------- SynthDoG

# LLaVA's brief image-description prompts (LLaVA paper, Table 8; the list Cerebras' preprocess_dataset.py
# draws SynthDoG questions from): the default.
BRIEF_DESCRIPTION_PROMPTS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]
# mmloom's reading prompts, which say what the answer is (the text in the image): `--prompts ocr`.
SYNTHDOG_OCR_PROMPTS = [
    "Read the text in the image.",
    "What text is written in this image?",
    "Transcribe the text shown in the image.",
    "Write out all the text in the image.",
    "What does the text in this image say?",
    "Extract the text from the image.",
    "Provide the full text written in the image.",
    "Copy the text that appears in the image.",
]
SYNTHDOG_PROMPTS = {"brief": BRIEF_DESCRIPTION_PROMPTS, "ocr": SYNTHDOG_OCR_PROMPTS}
SYNTHDOG_SPLITS = ("train", "validation")  # naver-clova-ix/synthdog-*: data/{split}-000NN-of-000MM-<hash>.parquet
_SPLIT_PREFIX = re.compile(r"^(train|validation|val|test)(?=[-_.])")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _split_of(path: Path) -> str | None:
    """The split a parquet file is named for (``train-00000-of-00084.parquet`` -> train), or None."""
    match = _SPLIT_PREFIX.match(path.name)
    return None if match is None else {"val": "validation"}.get(match.group(1), match.group(1))


def synthdog_files(ctx: Context) -> list[Path]:
    """The parquet files of --split (default train; ``val`` means validation).

    An explicit file is converted as given, unless --split was given and the file is named for
    another split. In a folder (or its ``data/``), the files named ``{split}-*``; when no file there
    is named by a split, all of them.

    Raises:
        MmloomError: an unknown split, a file of another split, or a folder without files of the split.
    """
    split = {"val": "validation"}.get(ctx.split or "train", ctx.split or "train")
    if split not in SYNTHDOG_SPLITS:
        raise MmloomError(f"synthdog: --split must be one of {', '.join(SYNTHDOG_SPLITS)}, not {ctx.split!r}")
    files = parquet_files(ctx.input)
    if ctx.input.is_file():
        named = _split_of(ctx.input)
        if ctx.split is not None and named is not None and named != split:
            raise MmloomError(f"{ctx.input}: a {named} file, but --split is {split}")
        return files
    named = {path: _split_of(path) for path in files}
    if not any(named.values()):
        return files
    chosen = [path for path in files if named[path] == split]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise MmloomError(f"{ctx.input}: no {split}-*.parquet file (files of split(s) {', '.join(found)}; "
                          "choose one with --split)")
    return chosen


def _synthdog_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if ctx.prompts not in SYNTHDOG_PROMPTS:
        raise MmloomError(f"synthdog: --prompts must be one of {', '.join(SYNTHDOG_PROMPTS)}, not {ctx.prompts!r}")
    for path in synthdog_files(ctx):
        for row, item in iter_parquet(path, ["image", "ground_truth"]):
            yield f"{path} row {row}", (path, row, item)


def _as_png(data: Any) -> bytes:
    """The image as PNG bytes (PNG input kept byte for byte); SkipRecord ``bad_image`` when it cannot be decoded."""
    img = decode_image_bytes(data)
    if bytes(data[:8]) == _PNG_SIGNATURE:
        return bytes(data)
    try:
        if img.mode not in _PNG_MODES:
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except (OSError, ValueError) as err:
        raise SkipRecord("bad_image", f"image cannot be re-encoded as PNG ({err})") from None
    return buf.getvalue()


def _synthdog_convert(ctx: Context, raw: tuple[Path, int, dict]) -> dict:
    path, row, item = raw
    truth = item["ground_truth"]
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except json.JSONDecodeError as err:
            raise SkipRecord("bad_field", f"ground_truth is not valid JSON ({err.msg})") from None
        except RecursionError:
            raise SkipRecord("bad_field", "ground_truth is JSON nested too deeply to read") from None
    answer = text(truth["gt_parse"], "text_sequence")
    record_id = f"{path.stem}/{row:07d}"  # unique across the shards of a dataset and across runs
    ref = ctx.save_image(f"{record_id}.png", _as_png((item["image"] or {}).get("bytes")))
    question = random.Random(f"{ctx.seed}:{record_id}").choice(SYNTHDOG_PROMPTS[ctx.prompts])
    return qa_record(record_id, ref, question, answer)


SOURCES = [
    Source("arxivcap", "ArxivCap parquet file or folder of *.parquet (single-figure captions; writes images)",
           _arxivcap_read, _arxivcap_convert, writes_images=True),
    Source("synthdog", "SynthDoG parquet file or folder of {split}-*.parquet (image, ground_truth; writes "
           "<parquet name>/<row>.png images)", _synthdog_read, _synthdog_convert, writes_images=True,
           has_splits=True),
]
