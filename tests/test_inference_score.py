"""`mmloom score`: VQA normalisation and accuracy, exact match, option letters, POPE yes/no."""

import json

import pytest

from mmloom.cli.main import main
from mmloom.inference.score import (
    extract_choice,
    normalize_exact,
    normalize_vqa,
    score_answers,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("The cat", "cat"),
    ("an apple!", "apple"),
    ("dont", "don't"),
    ("1,000", "1000"),
    ("hello-world", "hello world"),
    ("yes, it is", "yes it is"),
    ("3.5", "3.5"),
    ("  None\n", "0"),
    ("Ten", "10"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa(raw) == expected


def test_vqa_accuracy_counts_human_answers():
    humans = ["2", "two", "2", "3", "three", "2 dogs", "4", "4", "4", "4"]
    assert vqa_accuracy("Two.", humans) == 1.0  # 3 matches
    assert vqa_accuracy("three", humans) == pytest.approx(2 / 3)
    assert vqa_accuracy("2 dogs", humans) == pytest.approx(1 / 3)
    assert vqa_accuracy("five", humans) == 0.0


def test_exact_and_choice_extraction():
    assert normalize_exact("The Cat.") == "cat" and normalize_exact("A  red, circle!") == "red circle"
    cases = {"B": "B", "(C) a cat": "C", "The answer is D.": "D", "A.": "A", "answer: (B)": "B", "The answer is a cat": None,
             "I think it is C": "C", "no letter here": None}
    for text, letter in cases.items():
        assert extract_choice(text) == letter, text
    assert extract_choice("E is wrong, B", letters="ABCD") == "B"


def test_pope_yes_no_reading():
    assert yes_no("Yes, there is a dog.") == "yes"
    assert yes_no("No, there is not.") == "no"
    assert yes_no("There is not a cat in the image.") == "no"
    assert yes_no("Yes. No cat though.") == "yes"  # only the first sentence counts


def test_scores_yesno_with_f1_and_groups():
    # gold:  y y y y n n n n n n   pred: y y y n y n n n n y  -> TP 3, FN 1, FP 2, TN 4
    gold = "yyyynnnnnn"
    pred = ["Yes", "yes.", "Yes, it is", "No", "Yes", "No", "no.", "There is not", "No", "Yes"]
    answers = [{"question_id": i, "text": t} for i, t in enumerate(pred)]
    refs = [{"question_id": i, "label": "yes" if g == "y" else "no", "category": "random" if i < 5 else "adversarial"}
            for i, g in enumerate(gold)]
    result = score_answers(answers, refs, "yesno", by="category")
    overall = result["overall"]
    assert (overall["tp"], overall["fn"], overall["fp"], overall["tn"]) == (3, 1, 2, 4)
    assert overall["accuracy"] == pytest.approx(0.7)
    assert overall["precision"] == pytest.approx(3 / 5) and overall["recall"] == pytest.approx(3 / 4)
    assert overall["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert overall["yes_ratio"] == pytest.approx(0.5)
    assert result["groups"]["random"]["n"] == 5 and result["groups"]["random"]["accuracy"] == pytest.approx(0.6)


def test_score_cli_by_type_with_json(tmp_path, capsys):
    answers = [{"question_id": 1, "text": "Two"}, {"question_id": 2, "text": "red"},
               {"question_id": 3, "text": "blue"}, {"question_id": 99, "text": "stray"}]
    refs = [{"question_id": 1, "answers": ["2"] * 3 + ["3"] * 7, "question_type": "count"},
            {"question_id": 2, "answers": [{"answer": "red"}, {"answer": "Red"}], "question_type": "colour"},
            {"question_id": 3, "answers": ["green"] * 10, "question_type": "colour"},
            {"question_id": 4, "answers": ["x"] * 10, "question_type": "colour"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    assert main(["score", str(tmp_path / "a.jsonl"), "--references", str(tmp_path / "r.jsonl"), "--metric", "vqa",
                 "--by", "question_type", "--output-json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["overall"]["accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert result["groups"]["count"]["accuracy"] == 1.0
    assert result["groups"]["colour"]["accuracy"] == pytest.approx(1 / 3)
    assert result["missing"] == 1 and result["unmatched"] == 1
    out = capsys.readouterr().out
    assert "count" in out and "overall" in out and "55.56" in out
    assert main(["score", str(tmp_path / "a.jsonl"), "--references", str(tmp_path / "r.jsonl"), "--metric", "exact",
                 "--by", "nope"]) == 2
