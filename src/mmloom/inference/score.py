"""Score generated answers against references (LLaVA-style jsonl files, matched by `question_id`).

Answers: `mmloom generate` output, one JSON object per line with `question_id` and `text`.
References: one JSON object per line with `question_id` and, per metric:
- `exact`: `answer` (a string) or `answers` (a list); correct when the normalised answer (lowercase,
  punctuation and articles removed) equals any normalised reference.
- `vqa`: `answers`, the human answers (strings or `{"answer": ...}` records as in VQAv2's annotation
  files). The official VQA accuracy (VQA toolkit's `vqaEval.py`, LLaVA's `m4c_evaluator.py`): both the
  prediction and the human answers get the VQA answer normalisation (`normalize_vqa`); then for each
  of the n human answers, the subset of the other n - 1 answers scores min(#matches / 3, 1), and
  the question scores the mean over these n subsets. With 10 answers, 1 / 2 / 3 / 4 or more matches
  give 0.3 / 0.6 / 0.9 / 1.0. (The VQA toolkit skips the normalisation when all human answers agree;
  LLaVA normalises its predictions before submitting them, so normalising always gives its figures.) Fewer than 10 answers: the mean over the n available subsets (e.g. 3 of 5
  matching: (3 * 2/3 + 2 * 1) / 5 = 0.8); a single answer is an error (every subset would be empty).
- `choice`: `label` (else `answer`), an option letter; correct when the first option letter found in
  the answer (`extract_choice`, restricted to the first len(`options`) letters when the reference
  lists `options`/`choices`) equals it.
- `yesno`: `label` (else `answer`) yes/no; the answer is read as POPE does (`yes_no`). Reports accuracy,
  precision, recall and F1 with "yes" as the positive class, and the ratio of "yes" answers.
`--by FIELD` groups by a reference (or answer) field, e.g. the question type or POPE category.
Accuracy is always the fraction correct (1.0 = all right), never the error rate.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from mmloom.data.records_io import read_jsonl_objects
from mmloom.errors import MmloomError

METRICS = ("exact", "vqa", "choice", "yesno")

# ------------------------------------------------------------------------- VQA normalisation
# The VQA toolkit's contraction table (with its quirks, e.g. "somebody'd" -> "somebodyd"), kept as is for parity.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# Marks removed (or turned into a space) by the VQA normalisation; the period is handled apart.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    """The VQA toolkit's punctuation rule.

    Each mark of `PUNCTUATION` is deleted when the original text has that mark next to a space, or
    has a digit-comma-digit group anywhere ("1,000"); otherwise it is replaced by a space
    ("hello-world" -> "hello world"). Then every period not followed by a digit is deleted, so
    decimals ("3.5") survive and a final "." goes."""
    deletes_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if deletes_all or spaced else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    """The VQA toolkit's word rule: lowercase, split on whitespace, number words "none"/"zero".."ten"
    become digits, the articles a/an/the are dropped, then known contractions get their apostrophe."""
    words = (NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """The VQA answer normalisation (VQA toolkit `processPunctuation` then `processDigitArticle`, as
    LLaVA's evaluator applies it): newlines and tabs become spaces, `_vqa_punctuation`, then
    `_vqa_digits_articles`. Example: "Two dogs." -> "2 dogs"."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text)).strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one prediction against its n human answers, in [0, 1].

    Prediction and answers are normalised (`normalize_vqa`); for each human answer left out in turn,
    the other n - 1 answers give min(#equal to the prediction / 3, 1); the result is the mean over
    the n leave-one-out subsets. So with m of n answers matching it is
    (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n: 0.3 / 0.6 / 0.9 / 1.0 for m = 1 / 2 / 3 / 4+
    of n = 10. Raises `MmloomError` for fewer than 2 answers (no leave-one-out subset has an answer)."""
    if len(answers) < 2:
        raise MmloomError(f"VQA accuracy needs at least 2 human answers (10 in VQAv2), got {len(answers)}; "
                          "score single-answer references with --metric exact")
    pred = normalize_vqa(prediction)
    equal = [normalize_vqa(answer) == pred for answer in answers]
    matches = sum(equal)
    # leaving out a matching answer leaves matches - 1 in the subset, leaving out another one leaves matches
    subset_scores = [min((matches - left_out) / 3.0, 1.0) for left_out in equal]
    return sum(subset_scores) / len(subset_scores)


# ------------------------------------------------------------------------ other normalisations
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_exact(text: str) -> str:
    """Lowercase, punctuation removed, articles dropped, whitespace collapsed."""
    words = _NON_WORD.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "B", "B.", "(B)", "B) text", "B: text"
    re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?(?![A-Za-z])"),
    re.compile(r"(?<![A-Za-z])\(([A-Z])\)"),  # "... (C) ..."
    re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])"),  # any standalone capital letter
]


def extract_choice(text: str, letters: str | None = None) -> str | None:
    """The first option letter in an answer ("B", "(B) cat", "The answer is B."), or None.

    `letters` restricts the valid options (e.g. "ABCD")."""
    text = str(text)
    for pattern in _LETTER_PATTERNS:
        for match in pattern.finditer(text):
            letter = match.group(1).upper()
            if letters is not None and letter not in letters:
                continue
            pronoun = letter == "I" and pattern in (_LETTER_PATTERNS[0], _LETTER_PATTERNS[-1])
            if pronoun and (letters is None or "I" not in letters) and not re.match(r"\s*I[.:)]?\s*$", text):
                continue  # "I think ...": the pronoun, not an option
            return letter
    return None


def _option_letters(ref: dict[str, Any]) -> str | None:
    options = ref.get("options", ref.get("choices"))
    if isinstance(options, (list, tuple)) and 0 < len(options) <= 26:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]
    return None


def yes_no(text: str) -> str:
    """POPE's reading of an answer: the first sentence with "no"/"not" in it means no."""
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", " ").split()
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


# --------------------------------------------------------------------------------- scoring
def _reference_answers(ref: dict[str, Any]) -> list[str]:
    answers = ref.get("answers")
    if answers is None:
        answer = ref.get("answer", ref.get("label"))
        return [] if answer is None else [str(answer)]
    if isinstance(answers, str):
        return [answers]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]


def _label(ref: dict[str, Any], where: str, metric: str) -> str:
    value = ref.get("label", ref.get("answer"))
    if value is None:
        raise MmloomError(f"{where}: reference {ref.get('question_id')!r} has no 'label'/'answer' for metric {metric}")
    return str(value).strip()


# (answer, reference, where the reference is: "file:line" or "reference N")
Item = tuple[dict, dict, str]


def _is_correct(metric: str, answer: dict, ref: dict, where: str) -> float:
    """The score of one answer for `exact`, `vqa` or `choice`, in [0, 1]."""
    text = answer.get("text", "")
    if metric == "vqa":
        answers = _reference_answers(ref)
        try:
            return vqa_accuracy(text, answers)
        except MmloomError as err:
            raise MmloomError(f"{where}: reference {ref.get('question_id')!r}: {err}") from None
    if metric == "exact":
        pred = normalize_exact(text)
        return float(any(normalize_exact(a) == pred for a in _reference_answers(ref)))
    gold = _label(ref, where, metric)
    gold = extract_choice(gold) or gold.upper()
    return float(extract_choice(text, _option_letters(ref)) == gold)


def _summary(metric: str, items: list[Item]) -> dict[str, Any]:
    n = len(items)
    if metric == "yesno":
        tp = fp = tn = fn = 0
        for answer, ref, where in items:
            pred = yes_no(answer.get("text", ""))
            gold = "yes" if _label(ref, where, metric).lower().startswith("y") else "no"
            tp += pred == "yes" and gold == "yes"
            fp += pred == "yes" and gold == "no"
            tn += pred == "no" and gold == "no"
            fn += pred == "no" and gold == "yes"
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
                "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    scores = [_is_correct(metric, answer, ref, where) for answer, ref, where in items]
    return {"n": n, "accuracy": sum(scores) / n if n else 0.0}


def index_by_question_id(records: list[tuple[str, dict]], what: str) -> dict[str, tuple[str, dict]]:
    """`{str(question_id): (where, record)}` from `(where, record)` pairs (`where` = "file:line").

    Ids compare as strings (1 and "1" are the same question). Raises `MmloomError` naming `where` for a
    record without `question_id`, and naming the id and both places for an id that appears twice."""
    index: dict[str, tuple[str, dict]] = {}
    for where, record in records:
        if "question_id" not in record:
            raise MmloomError(f"{where}: {what} without a 'question_id'")
        key = str(record["question_id"])
        if key in index:
            raise MmloomError(f"{where}: question_id {record['question_id']!r} appears twice in the {what}s "
                              f"(first at {index[key][0]}); each question must appear once")
        index[key] = (where, record)
    return index


def _score(answers: list[tuple[str, dict]], references: list[tuple[str, dict]], metric: str,
           by: str | None) -> dict[str, Any]:
    if metric not in METRICS:
        raise MmloomError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    refs = index_by_question_id(references, "reference")
    predictions = index_by_question_id(answers, "answer")
    items: list[Item] = [(answer, refs[key][1], refs[key][0]) for key, (_, answer) in predictions.items()
                         if key in refs]
    result: dict[str, Any] = {"metric": metric, "overall": _summary(metric, items),
                              "missing": len(refs) - len(items), "unmatched": len(predictions) - len(items)}
    if by is not None:
        groups: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            value = item[1].get(by, item[0].get(by))
            groups["(none)" if value is None else str(value)].append(item)
        if set(groups) == {"(none)"}:
            raise MmloomError(f"no reference or answer has the field {by!r}")
        result["by"] = by
        result["groups"] = {name: _summary(metric, groups[name]) for name in sorted(groups)}
    return result


def score_answers(answers: list[dict], references: list[dict], metric: str, by: str | None = None) -> dict[str, Any]:
    """Scores answers against references matched by `question_id` (overall, and per value of `by`).

    Returns `{"metric", "overall": {"n", "accuracy", ...}, "missing": references without an answer,
    "unmatched": answers without a reference}` (+ `"by"`, `"groups"`); accuracy is the fraction in
    [0, 1] (see the module docstring per metric). Raises `MmloomError` for an unknown metric, a record
    without `question_id`, an id twice among the answers or among the references (naming "answer N" /
    "reference N", 1-based), a reference lacking what its metric needs, or a `by` field nobody has."""
    return _score([(f"answer {n}", a) for n, a in enumerate(answers, 1)],
                  [(f"reference {n}", r) for n, r in enumerate(references, 1)], metric, by)


def is_score_output(path: str | Path) -> bool:
    """Whether `path` is a scores JSON written by `mmloom score --output-json` (an object with the
    metric and the overall scores)."""
    from mmloom.files import read_json

    try:
        data = read_json(path, max_bytes=64 * 2**20)
    except MmloomError:
        return False
    return isinstance(data.get("metric"), str) and isinstance(data.get("overall"), dict)


def score_files(answers_path: str | Path, references_path: str | Path, metric: str,
                by: str | None = None) -> dict[str, Any]:
    """`score_answers` on two jsonl files; errors name the file and line ("refs.jsonl:7: ...")."""
    answers = [(f"{answers_path}:{n}", r) for n, r in read_jsonl_objects(answers_path, "answers file")]
    references = [(f"{references_path}:{n}", r) for n, r in read_jsonl_objects(references_path, "references file")]
    return _score(answers, references, metric, by)


def format_table(result: dict[str, Any]):
    """A rich table of the result (percentages)."""
    from rich.table import Table

    keys = ["accuracy", "precision", "recall", "f1", "yes_ratio"] if result["metric"] == "yesno" else ["accuracy"]
    table = Table(title=f"{result['metric']} scores")
    table.add_column(result.get("by", "group"))
    table.add_column("n", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    rows = [(name, s) for name, s in result.get("groups", {}).items()] + [("overall", result["overall"])]
    for name, summary in rows:
        table.add_row(name, str(summary["n"]), *(f"{100 * summary[k]:.2f}" for k in keys))
    return table
