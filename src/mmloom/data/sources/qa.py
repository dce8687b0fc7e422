"""Question-answer datasets whose images already lie on disk: AI2D, ArxivQA, ChartQA, DocVQA, InfoVQA, DVQA."""

from __future__ import annotations

import re
from collections.abc import Iterator
from string import ascii_lowercase, ascii_uppercase
from typing import Any

from mmloom.data.sources.core import (
    Context,
    SkipRecord,
    Source,
    as_text,
    find_file,
    iter_jsonl,
    json_list,
    load_json,
    qa_record,
    text,
)
from mmloom.errors import MmloomError

# ---------------------------------------------------------------------------------------------- AI2D


def _ai2d_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    qdir = ctx.input / "questions"
    if not qdir.is_dir():
        raise MmloomError(f"{ctx.input}: expected the AI2D root folder holding questions/ and images/")
    for path in sorted(qdir.glob("*.json")):
        data = load_json(path)
        questions = data.get("questions") if isinstance(data, dict) else None
        if not isinstance(questions, dict) or "imageName" not in data:
            yield str(path), SkipRecord("missing_field", "expected 'imageName' and a 'questions' object")
            continue
        for i, (question, entry) in enumerate(questions.items()):
            yield f"{path} question {i}", (data["imageName"], question, entry)


def _ai2d_convert(ctx: Context, raw: tuple[Any, str, dict]) -> dict:
    image_name, question, entry = raw
    options = [as_text(o, "option") for o in entry["answerTexts"]]
    correct = entry["correctAnswer"]
    if len(options) > len(ascii_lowercase):
        raise SkipRecord("bad_field", f"too many options ({len(options)})")
    if isinstance(correct, bool) or not isinstance(correct, int) or not 0 <= correct < len(options):
        raise SkipRecord("bad_label", f"correctAnswer {correct!r} with {len(options)} options")
    labeled = [f"{ascii_lowercase[i]}) {option}" for i, option in enumerate(options)]
    image = ctx.image_ref(ctx.input / "images" / str(image_name))
    return qa_record(entry["questionId"], image, "\n".join([question, *labeled]), labeled[correct])


# ---------------------------------------------------------------------------------------------- ArxivQA

_OPTION_LETTER = re.compile(r"^\(?[A-Za-z][).:]")  # "A) text", "(A) text", "A. text"
_LABEL_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:$|[).:])")  # "A", "A)", "(A)", "A) text"


def _arxivqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if not ctx.input.is_file():
        raise MmloomError(f"{ctx.input}: expected the ArxivQA .jsonl file")
    yield from iter_jsonl(ctx.input)


def _arxivqa_convert(ctx: Context, raw: dict) -> dict:
    question = text(raw, "question")
    options = [as_text(o, "option") for o in raw["options"]]
    if len(options) > len(ascii_uppercase):
        raise SkipRecord("bad_field", f"too many options ({len(options)})")
    shown = [o if _OPTION_LETTER.match(o) else f"{ascii_uppercase[i]}) {o}" for i, o in enumerate(options)]
    label = str(raw.get("label") or "").strip()
    if not label:
        raise SkipRecord("bad_label", "empty label")
    match = _LABEL_LETTER.match(label)
    if match:
        index = ascii_uppercase.index(match.group(1).upper())
        if index >= len(options):
            raise SkipRecord("bad_label", f"label {label!r} but only {len(options)} options")
        label = shown[index]
    rationale = str(raw.get("rationale") or "").strip()
    answer = f"{label} {rationale}" if rationale else label
    image = ctx.image_ref(ctx.root / text(raw, "image"))
    return qa_record(raw["id"], image, "\n".join([question, *shown]), answer)


# ---------------------------------------------------------------------------------------------- ChartQA

CHARTQA_SPLITS = ("train", "val", "test")


def _chartqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if ctx.split not in CHARTQA_SPLITS:
        raise MmloomError(f"chartqa: --split must be one of {', '.join(CHARTQA_SPLITS)}, not {ctx.split!r}")
    if not ctx.input.is_dir():
        raise MmloomError(f"{ctx.input}: expected the ChartQA root folder (holding train/, val/, test/)")
    for subset in ("human", "augmented"):
        path = ctx.input / ctx.split / f"{ctx.split}_{subset}.json"
        if not path.is_file():
            raise MmloomError(f"{path}: file not found (check --input and --split)")
        for i, item in enumerate(json_list(path)):
            yield f"{path}[{i}]", (f"{ctx.split}_{subset}_{i}", item)


def _chartqa_convert(ctx: Context, raw: tuple[str, dict]) -> dict:
    record_id, item = raw
    question, answer = text(item, "query"), text(item, "label")
    image = ctx.image_ref(ctx.input / ctx.split / "png" / text(item, "imgname"))
    return qa_record(record_id, image, question, answer)


# ---------------------------------------------------------------------------------------------- DocVQA family


def _docvqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    names = [f"{ctx.split}_v1.0_withQT.json", f"{ctx.split}_v1.0.json"]
    path = find_file(ctx, names)
    for i, item in enumerate(json_list(path, "data")):
        yield f"{path}[{i}]", item


def _infovqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    names = [f"infographicsVQA_{ctx.split}_v1.0_withQT.json", f"infographicsVQA_{ctx.split}_v1.0.json",
             f"{ctx.split}_v1.0_withQT.json", f"{ctx.split}_v1.0.json"]
    path = find_file(ctx, names)
    for i, item in enumerate(json_list(path, "data")):
        yield f"{path}[{i}]", item


def _first_answer(item: dict) -> str:
    answers = item["answers"]
    if not isinstance(answers, list) or not answers:
        raise SkipRecord("missing_field", "no answers")
    return as_text(answers[0], "answers[0]")


def _docvqa_convert(ctx: Context, item: dict) -> dict:
    question, answer = text(item, "question"), _first_answer(item)
    name = text(item, "image")  # e.g. "documents/ffbf0023_4.png"
    image = ctx.image_ref(ctx.root / name, ctx.root / "images" / name.rsplit("/", 1)[-1])
    return qa_record(item["questionId"], image, question, answer)


def _infovqa_convert(ctx: Context, item: dict) -> dict:
    question, answer = text(item, "question"), _first_answer(item)
    name = text(item, "image_local_name")
    image = ctx.image_ref(ctx.root / "images" / name, ctx.root / name)
    return qa_record(item["questionId"], image, question, answer)


# ---------------------------------------------------------------------------------------------- DVQA


def _dvqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    path = find_file(ctx, [f"{ctx.split}_qa.json"])
    for i, item in enumerate(json_list(path)):
        yield f"{path}[{i}]", item


def _dvqa_convert(ctx: Context, item: dict) -> dict:
    question, answer = text(item, "question"), text(item, "answer")
    image = ctx.image_ref(ctx.root / "images" / text(item, "image"))
    return qa_record(item["question_id"], image, question, answer)


SOURCES = [
    Source("ai2d", "AI2D root folder with questions/*.json and images/", _ai2d_read, _ai2d_convert),
    Source("arxivqa", "ArxivQA .jsonl file; images relative to its folder", _arxivqa_read, _arxivqa_convert),
    Source("chartqa", "ChartQA root: {split}/{split}_human.json, {split}_augmented.json, {split}/png/",
           _chartqa_read, _chartqa_convert),
    Source("docvqa", "SP-DocVQA folder with {split}_v1.0_withQT.json (or that file)", _docvqa_read, _docvqa_convert),
    Source("infographicsvqa", "InfographicsVQA folder with infographicsVQA_{split}_v1.0[_withQT].json "
           "and images/ (or that file)", _infovqa_read, _infovqa_convert),
    Source("dvqa", "DVQA folder with {split}_qa.json and images/ (or that file)", _dvqa_read, _dvqa_convert),
]
