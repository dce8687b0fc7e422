"""Question-answer datasets whose images already lie on disk: AI2D, ArxivQA, ChartQA, DocVQA, InfoVQA, DVQA."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from string import ascii_lowercase, ascii_uppercase
from typing import Any

from mmloom.data.records_io import JsonFileError, SkipRecord, iter_json_list, iter_jsonl, load_json
from mmloom.data.sources.core import Context, Source, as_text, find_file, qa_record, text, with_options
from mmloom.errors import MmloomError

# ---------------------------------------------------------------------------------------------- AI2D


def _ai2d_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    qdir = ctx.input / "questions"
    if not qdir.is_dir():
        raise MmloomError(f"{ctx.input}: expected the AI2D root folder holding questions/ and images/")
    for path in sorted(qdir.glob("*.json")):
        try:
            data = load_json(path)
        except JsonFileError as err:  # one broken question file: counted, the others converted
            yield str(path), SkipRecord(err.reason, str(err).removeprefix(f"{path}: "))
            continue
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
    name = as_text(image_name, "imageName")
    image = ctx.find_image(name, f"images/{name}", field="imageName")
    return qa_record(entry["questionId"], image, with_options(question, labeled, ctx.options), labeled[correct])


# ---------------------------------------------------------------------------------------------- ArxivQA

_OPTION_LETTER = re.compile(r"^(\(?)([A-Z])([).:])")  # "A) text", "(A) text", "A. text", "A: text"
_LABEL_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:$|[).:])")  # "A", "A)", "(A)", "A) text"


def lettered(options: list[str]) -> bool:
    """True when every option is lettered A, B, C, ... in order, all in one style (``A)``, ``(A)``, ``A.``, ``A:``).

    Options such as ``["E. coli", "B. subtilis"]`` merely start with a letter and a dot: they are not
    lettered (the letters are not A, B, ... in order), so they get labels of their own.
    """
    styles = set()
    for i, option in enumerate(options):
        match = _OPTION_LETTER.match(option.lstrip())
        if match is None or match.group(2) != ascii_uppercase[i]:
            return False
        styles.add((match.group(1), match.group(3)))
    return len(styles) == 1


def _arxivqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    if not ctx.input.is_file():
        raise MmloomError(f"{ctx.input}: expected the ArxivQA .jsonl file")
    yield from iter_jsonl(ctx.input)


def _arxivqa_label(label: str, options: list[str], shown: list[str]) -> str:
    """The shown option the label names: the option's own text, or its letter (``B``, ``(B)``, ``B) ...``)."""
    for option, display in zip(options, shown, strict=True):
        if label == option.strip() or label == display.strip():
            return display
    match = _LABEL_LETTER.match(label)
    if match is None:
        return label  # free-text answer, kept as is
    index = ascii_uppercase.index(match.group(1).upper())
    if index >= len(options):
        raise SkipRecord("bad_label", f"label {label!r} but only {len(options)} options")
    return shown[index]


def _arxivqa_convert(ctx: Context, raw: dict) -> dict:
    question = text(raw, "question")
    options = [as_text(o, "option") for o in raw["options"]]
    if len(options) > len(ascii_uppercase):
        raise SkipRecord("bad_field", f"too many options ({len(options)})")
    shown = options if lettered(options) else [f"{ascii_uppercase[i]}) {o}" for i, o in enumerate(options)]
    label = str(raw.get("label") or "").strip()
    if not label:
        raise SkipRecord("bad_label", "empty label")
    label = _arxivqa_label(label, options, shown)
    rationale = str(raw.get("rationale") or "").strip()
    answer = f"{label} {rationale}" if rationale else label
    image = ctx.find_image(raw["image"])
    return qa_record(raw["id"], image, with_options(question, shown, ctx.options), answer)


# ---------------------------------------------------------------------------------------------- ChartQA

CHARTQA_SPLITS = ("train", "val", "test")


def _chartqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    split = ctx.split_or("train", CHARTQA_SPLITS, "chartqa")
    if not ctx.input.is_dir():
        raise MmloomError(f"{ctx.input}: expected the ChartQA root folder (holding train/, val/, test/)")
    for subset in ("human", "augmented"):
        path = ctx.input / split / f"{split}_{subset}.json"
        if not path.is_file():
            raise MmloomError(f"{path}: file not found (check --input and --split)")
        for i, (where, item) in enumerate(iter_json_list(path)):  # one (where, item) per list element
            yield where, item if isinstance(item, SkipRecord) else (f"{split}_{subset}_{i}", item)


def _chartqa_convert(ctx: Context, raw: tuple[str, dict]) -> dict:
    record_id, item = raw
    question, answer = text(item, "query"), text(item, "label")
    name = text(item, "imgname")
    image = ctx.find_image(name, f"{ctx.split_or('train')}/png/{name}", field="imgname")
    return qa_record(record_id, image, question, answer)


# ---------------------------------------------------------------------------------------------- DocVQA family
# Official downloads (https://rrc.cvc.uab.es/?ch=17): spdocvqa_qas/{train,val}_v1.0_withQT.json, test_v1.0.json
# with "image": "documents/<name>.png", images in spdocvqa_images/<name>.png; infographicsvqa_qas/
# infographicsVQA_{train_v1.0, val_v1.0_withQT, test_v1.0}.json with "image_local_name", images in
# infographicsvqa_images/. Older releases: train/train_v1.0.json next to train/documents/.


def _with_folder(path: Path, items: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Pair each item with the folder of its question file (images may lie next to it)."""
    for where, item in items:
        yield where, item if isinstance(item, SkipRecord) else (path.parent, item)


def _docvqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    split = ctx.split_or("train")
    path = find_file(ctx, [f"{split}_v1.0_withQT.json", f"{split}_v1.0.json"], ("spdocvqa_qas", split))
    yield from _with_folder(path, iter_json_list(path, "data"))


def _infovqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    split = ctx.split_or("train")
    names = [f"infographicsVQA_{split}_v1.0_withQT.json", f"infographicsVQA_{split}_v1.0.json",
             f"{split}_v1.0_withQT.json", f"{split}_v1.0.json"]
    path = find_file(ctx, names, ("infographicsvqa_qas",))
    yield from _with_folder(path, iter_json_list(path, "data"))


def _first_answer(item: dict) -> str:
    answers = item.get("answers")
    if not isinstance(answers, list) or not answers:
        raise SkipRecord("missing_field", "no answers (test splits have none)")
    return as_text(answers[0], "answers[0]")


def _docvqa_convert(ctx: Context, raw: tuple[Path, dict]) -> dict:
    folder, item = raw
    question, answer = text(item, "question"), _first_answer(item)
    name = text(item, "image")  # "documents/ffbf0023_4.png"
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    places = [f"{name}", f"images/{base}", f"spdocvqa_images/{base}"]
    image = ctx.find_image(name, *(d / p for d in (folder, ctx.root) for p in places))
    return qa_record(item["questionId"], image, question, answer)


def _infovqa_convert(ctx: Context, raw: tuple[Path, dict]) -> dict:
    folder, item = raw
    question, answer = text(item, "question"), _first_answer(item)
    name = text(item, "image_local_name")  # "38490.jpeg"
    places = [f"images/{name}", name, f"infographicsvqa_images/{name}"]
    image = ctx.find_image(name, *(d / p for d in (folder, ctx.root) for p in places), field="image_local_name")
    return qa_record(item["questionId"], image, question, answer)


# ---------------------------------------------------------------------------------------------- DVQA
# Official download (github.com/kushalkafle/DVQA_dataset): images/ and qa/{train,val_easy,val_hard}_qa.json.


def _dvqa_read(ctx: Context) -> Iterator[tuple[str, Any]]:
    path = find_file(ctx, [f"{ctx.split_or('train')}_qa.json"], ("qa",))
    yield from iter_json_list(path)


def _dvqa_convert(ctx: Context, item: dict) -> dict:
    question, answer = text(item, "question"), text(item, "answer")
    name = text(item, "image")
    image = ctx.find_image(name, f"images/{name}")
    return qa_record(item["question_id"], image, question, answer)


SOURCES = [
    Source("ai2d", "AI2D root folder with questions/*.json and images/ (options inline as 'Q a) .. b) ..')",
           _ai2d_read, _ai2d_convert),
    Source("arxivqa", "ArxivQA .jsonl file; images relative to its folder", _arxivqa_read, _arxivqa_convert),
    Source("chartqa", "ChartQA root: {split}/{split}_human.json, {split}/{split}_augmented.json, {split}/png/",
           _chartqa_read, _chartqa_convert, has_splits=True),
    Source("docvqa", "SP-DocVQA {split}_v1.0_withQT.json (or that file's folder, e.g. spdocvqa_qas/; images "
           "there or in --image-dir, e.g. spdocvqa_images/)", _docvqa_read, _docvqa_convert, has_splits=True),
    Source("infographicsvqa", "InfographicsVQA infographicsVQA_{split}_v1.0[_withQT].json (or its folder, "
           "e.g. infographicsvqa_qas/; images in images/ or --image-dir)", _infovqa_read, _infovqa_convert,
           has_splits=True),
    Source("dvqa", "DVQA folder with {split}_qa.json (or qa/{split}_qa.json) and images/, or that file",
           _dvqa_read, _dvqa_convert, has_splits=True),
]
