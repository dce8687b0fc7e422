"""Score generated answers against references.

Metrics:
- `exact`: normalised exact match (lowercase, punctuation and articles removed) against the
  reference `answer` (or any of `answers`).
- `vqa`: VQA accuracy with the standard answer normalisation (punctuation, number words ->
  digits, articles, contractions); per question min(#human answers equal to the prediction / 3, 1);
  references carry `answers` (strings or `{"answer": ...}` records).
- `choice`: the first option letter found in the answer equals the reference letter (`answer`).
- `yesno`: POPE-style yes/no (an answer whose first sentence contains "no"/"not" is "no"),
  accuracy, precision, recall, F1 (positive = yes) and the ratio of "yes" answers; references
  carry `label` (or `answer`) yes/no.
`--by FIELD` groups by a reference (or answer) field, e.g. the question type or POPE category.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from mmloom.errors import MmloomError

METRICS = ("exact", "vqa", "choice", "yesno")

# ------------------------------------------------------------------------- VQA normalisation
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
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(text: str) -> str:
    """The VQA evaluation's answer normalisation (as in the official and LLaVA evaluators)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text)).strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    pred = normalize_vqa(prediction)
    matches = sum(normalize_vqa(a) == pred for a in answers)
    return min(matches / 3.0, 1.0)


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


def _label(ref: dict[str, Any], metric: str) -> str:
    value = ref.get("label", ref.get("answer"))
    if value is None:
        raise MmloomError(f"reference {ref.get('question_id')!r} has no 'label'/'answer' for metric {metric}")
    return str(value).strip()


def _summary(metric: str, items: list[tuple[dict, dict]]) -> dict[str, Any]:
    n = len(items)
    if metric == "yesno":
        tp = fp = tn = fn = 0
        for answer, ref in items:
            pred = yes_no(answer.get("text", ""))
            gold = "yes" if _label(ref, metric).lower().startswith("y") else "no"
            tp += pred == "yes" and gold == "yes"
            fp += pred == "yes" and gold == "no"
            tn += pred == "no" and gold == "no"
            fn += pred == "no" and gold == "yes"
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
                "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    scores = []
    for answer, ref in items:
        text = answer.get("text", "")
        if metric == "vqa":
            answers = _reference_answers(ref)
            if not answers:
                raise MmloomError(f"reference {ref.get('question_id')!r} has no 'answers' for metric vqa")
            scores.append(vqa_accuracy(text, answers))
        elif metric == "exact":
            pred = normalize_exact(text)
            scores.append(float(any(normalize_exact(a) == pred for a in _reference_answers(ref))))
        elif metric == "choice":
            gold = extract_choice(_label(ref, metric)) or _label(ref, metric).upper()
            scores.append(float(extract_choice(text, _option_letters(ref)) == gold))
    return {"n": n, "accuracy": sum(scores) / n if n else 0.0}


def score_answers(answers: list[dict], references: list[dict], metric: str, by: str | None = None) -> dict[str, Any]:
    """Scores overall (and per group of `by`); answers and references are matched by question_id."""
    if metric not in METRICS:
        raise MmloomError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    refs: dict[str, dict] = {}
    for ref in references:
        if "question_id" not in ref:
            raise MmloomError("every reference needs a 'question_id'")
        refs[str(ref["question_id"])] = ref
    items, unmatched = [], 0
    seen = set()
    for answer in answers:
        key = str(answer.get("question_id"))
        if key not in refs:
            unmatched += 1
            continue
        if key in seen:
            raise MmloomError(f"question_id {answer.get('question_id')!r} is answered twice")
        seen.add(key)
        items.append((answer, refs[key]))
    result: dict[str, Any] = {"metric": metric, "overall": _summary(metric, items),
                              "missing": len(refs) - len(seen), "unmatched": unmatched}
    if by is not None:
        groups: dict[str, list] = defaultdict(list)
        for answer, ref in items:
            value = ref.get(by, answer.get(by))
            groups["(none)" if value is None else str(value)].append((answer, ref))
        if set(groups) == {"(none)"}:
            raise MmloomError(f"no reference or answer has the field {by!r}")
        result["by"] = by
        result["groups"] = {name: _summary(metric, groups[name]) for name in sorted(groups)}
    return result


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
