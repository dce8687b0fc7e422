"""`mmloom score`: VQA normalisation and accuracy, exact match, option letters, POPE yes/no."""

import json

import pytest

from mmloom.cli.main import main
from mmloom.errors import MmloomError
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


@pytest.mark.parametrize("raw, expected", [
    ("hello-world, yes", "hello world yes"),  # "-" not next to a space -> space; ", " is -> deleted
    ("cat-dog 1,5", "catdog 15"),  # a digit,digit group anywhere: every mark is deleted, not spaced
    ("a.b end.", "ab end"),  # a period not followed by a digit goes, wherever it is
    ("Isnt it", "isn't it"),  # contraction map applies after lowercasing
    ("None of the three", "0 of 3"),  # number words (incl. "none") -> digits, articles dropped
    ("(yes)", "yes"),
    ("x/y", "x y"),
])
def test_vqa_punctuation_and_word_rules(raw, expected):
    assert normalize_vqa(raw) == expected


def test_vqa_accuracy_is_the_official_leave_one_out_mean():
    # 10 human answers; normalised: 2, 2, 2, 3, 3, 2 dogs, 4, 4, 4, 4
    humans = ["2", "two", "2", "3", "three", "2 dogs", "4", "4", "4", "4"]
    # m matches of 10: leaving out one of the m leaves m-1, leaving out another leaves m:
    # m = 3: (3 * min(2/3, 1) + 7 * min(3/3, 1)) / 10 = (2 + 7) / 10 = 0.9
    assert vqa_accuracy("Two.", humans) == pytest.approx(0.9)
    # m = 2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    assert vqa_accuracy("three", humans) == pytest.approx(0.6)
    # m = 1: (1 * 0 + 9 * 1/3) / 10 = 3/10
    assert vqa_accuracy("2 dogs", humans) == pytest.approx(0.3)
    # m = 4: (4 * min(3/3, 1) + 6 * min(4/3, 1)) / 10 = 1
    assert vqa_accuracy("four", humans) == 1.0
    assert vqa_accuracy("five", humans) == 0.0
    # m = 10: every subset has 9 matches -> 1
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_vqa_accuracy_with_fewer_than_ten_answers():
    # n = 5, m = 3: (3 * 2/3 + 2 * 1) / 5 = (2 + 2) / 5 = 0.8 (the mean over the 5 available subsets)
    assert vqa_accuracy("red", ["red", "red", "Red.", "blue", "green"]) == pytest.approx(0.8)
    # n = 5, m = 1: (1 * 0 + 4 * 1/3) / 5 = 4/15
    assert vqa_accuracy("blue", ["red", "red", "Red.", "blue", "green"]) == pytest.approx(4 / 15)
    # n = 2, m = 2: each subset keeps 1 match -> 1/3
    assert vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    # n = 1: the only subset is empty, so the formula would always give 0: refused
    with pytest.raises(MmloomError, match="at least 2 human answers"):
        vqa_accuracy("red", ["red"])


def test_exact_and_choice_extraction():
    assert normalize_exact("The Cat.") == "cat" and normalize_exact("A  red, circle!") == "red circle"
    cases = {"B": "B", "(C) a cat": "C", "The answer is D.": "D", "A.": "A", "answer: (B)": "B", "The answer is a cat": None,
             "I think it is C": "C", "no letter here": None}
    for text, letter in cases.items():
        assert extract_choice(text) == letter, text
    assert extract_choice("E is wrong, B", letters="ABCD") == "B"


def test_exact_accuracy_pinned():
    refs = [{"question_id": 1, "answer": "The Cat."}, {"question_id": 2, "answers": ["dog", "puppy"]},
            {"question_id": 3, "answer": "red"}, {"question_id": 4, "answer": "2"}, {"question_id": 5, "answer": "blue"}]
    preds = ["cat", "A puppy!", "red car", "two", "Blue"]
    # right: 1 (cat = cat), 2 (puppy among the answers), 5 (case); wrong: 3 (extra word), 4 (no number words
    # in exact match) -> accuracy 3/5 = 0.6 (the error rate would be 0.4)
    result = score_answers([{"question_id": i, "text": t} for i, t in enumerate(preds, 1)], refs, "exact")
    assert result["overall"] == {"n": 5, "accuracy": pytest.approx(0.6)}


def test_choice_accuracy_pinned():
    refs = [{"question_id": 1, "answer": "B"}, {"question_id": 2, "answer": "C"},
            {"question_id": 3, "answer": "A", "options": ["cat", "dog"]}, {"question_id": 4, "label": "(D)"}]
    preds = ["(B) a cat", "The answer is D.", "E. no wait, A", "D"]
    # 1: B = B; 2: D != C; 3: options A/B only, so "E" is passed over and "A" read; 4: gold "(D)" -> D = D
    # -> accuracy 3/4 = 0.75 (the error rate would be 0.25)
    result = score_answers([{"question_id": i, "text": t} for i, t in enumerate(preds, 1)], refs, "choice")
    assert result["overall"] == {"n": 4, "accuracy": pytest.approx(0.75)}


def test_vqa_metric_pinned_through_score_answers():
    refs = [{"question_id": "a", "answers": ["2"] * 3 + ["3"] * 7},
            {"question_id": "b", "answers": [{"answer": "red"}, {"answer": "Red"}] + [{"answer": "maroon"}] * 8}]
    answers = [{"question_id": "a", "text": "Two"}, {"question_id": "b", "text": "red"}]
    # a: 3 of 10 -> 0.9; b: 2 of 10 -> 0.6; mean 0.75 (error rate 0.25)
    assert score_answers(answers, refs, "vqa")["overall"] == {"n": 2, "accuracy": pytest.approx(0.75)}
    refs.append({"question_id": "c", "answer": "blue"})
    with pytest.raises(MmloomError, match=r"^reference 3: reference 'c': VQA accuracy needs at least 2"):
        score_answers(answers + [{"question_id": "c", "text": "blue"}], refs, "vqa")


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
    # accuracy (TP + TN) / n = 7/10; precision TP / (TP + FP) = 3/5; recall TP / (TP + FN) = 3/4;
    # F1 = 2 P R / (P + R) = 2 * 0.6 * 0.75 / 1.35 = 0.9 / 1.35 = 2/3; yes ratio (TP + FP) / n = 5/10
    assert overall["accuracy"] == pytest.approx(0.7)
    assert overall["precision"] == pytest.approx(3 / 5) and overall["recall"] == pytest.approx(3 / 4)
    assert overall["f1"] == pytest.approx(2 / 3)
    assert overall["yes_ratio"] == pytest.approx(0.5)
    # random (ids 0-4): gold y y y y n, pred y y y n y -> TP 3, FN 1, FP 1, TN 0: accuracy 3/5, P 3/4, R 3/4, F1 3/4
    random = result["groups"]["random"]
    assert (random["n"], random["tp"], random["fn"], random["fp"], random["tn"]) == (5, 3, 1, 1, 0)
    assert random["accuracy"] == pytest.approx(0.6) and random["f1"] == pytest.approx(0.75)
    # adversarial (ids 5-9): gold all n, pred n n n n y -> TN 4, FP 1: accuracy 4/5, P 0/1 = 0, R 0/0 -> 0, F1 0
    adversarial = result["groups"]["adversarial"]
    assert adversarial["accuracy"] == pytest.approx(0.8) and adversarial["yes_ratio"] == pytest.approx(0.2)
    assert (adversarial["precision"], adversarial["recall"], adversarial["f1"]) == (0.0, 0.0, 0.0)


def _write_jsonl(path, records, blank_after=()):
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i in blank_after else "") for i, r in enumerate(records)))
    return str(path)


def test_score_cli_by_type_with_json(tmp_path, capsys):
    answers = [{"question_id": 1, "text": "Two"}, {"question_id": 2, "text": "red"},
               {"question_id": 3, "text": "blue"}, {"question_id": 99, "text": "stray"}]
    refs = [{"question_id": 1, "answers": ["2"] * 3 + ["3"] * 7, "question_type": "count"},
            {"question_id": 2, "answers": [{"answer": "red"}, {"answer": "Red"}] + ["maroon"] * 8,
             "question_type": "colour"},
            {"question_id": 3, "answers": ["blue"] + ["green"] * 9, "question_type": "colour"},
            {"question_id": 4, "answers": ["x"] * 10, "question_type": "colour"}]
    a, r = _write_jsonl(tmp_path / "a.jsonl", answers), _write_jsonl(tmp_path / "r.jsonl", refs)
    assert main(["score", a, "--references", r, "--metric", "vqa",
                 "--by", "question_type", "--output-json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    # 1: 3 of 10 match -> 0.9; 2: 2 of 10 -> 0.6; 3: 1 of 10 -> 0.3; overall (0.9 + 0.6 + 0.3) / 3 = 0.6
    assert result["overall"] == {"n": 3, "accuracy": pytest.approx(0.6)}
    assert result["groups"]["count"]["accuracy"] == pytest.approx(0.9)
    assert result["groups"]["colour"]["accuracy"] == pytest.approx((0.6 + 0.3) / 2)
    assert result["missing"] == 1 and result["unmatched"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "r.jsonl", "s.json"]  # no temp file left
    out = capsys.readouterr().out
    assert "count" in out and "overall" in out and "60.00" in out and "45.00" in out and "90.00" in out
    assert main(["score", a, "--references", r, "--metric", "exact", "--by", "nope"]) == 2


def test_score_duplicate_ids_are_errors_naming_id_and_line(tmp_path, capsys):
    refs = [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "dog"}, {"question_id": "1", "answer": "cow"}]
    answers = [{"question_id": 1, "text": "cat"}, {"question_id": 7, "text": "x"}, {"question_id": 7, "text": "y"}]
    r = _write_jsonl(tmp_path / "r.jsonl", refs, blank_after={0})  # a blank line 2: the duplicate is on line 4
    a = _write_jsonl(tmp_path / "a.jsonl", answers)
    a_ok = _write_jsonl(tmp_path / "a_ok.jsonl", answers[:2])
    r_ok = _write_jsonl(tmp_path / "r_ok.jsonl", refs[:2])
    assert main(["score", a_ok, "--references", r, "--metric", "exact"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"mmloom score: error: {r}:4: question_id '1' appears twice in the references "
                           f"(first at {r}:1); each question must appear once")
    # a duplicate answer id is an error too, even for an id without a reference
    assert main(["score", a, "--references", r_ok, "--metric", "exact"]) == 2
    err = capsys.readouterr().err
    assert f"{a}:3: question_id 7 appears twice in the answers (first at {a}:2)" in err
    with pytest.raises(MmloomError, match=r"^answer 2: question_id 1 appears twice in the answers \(first at answer 1\)"):
        score_answers([answers[0], answers[0]], refs[:2], "exact")
    _write_jsonl(tmp_path / "a_noid.jsonl", [{"text": "cat"}])
    assert main(["score", str(tmp_path / "a_noid.jsonl"), "--references", r_ok, "--metric", "exact"]) == 2
    assert f"{tmp_path / 'a_noid.jsonl'}:1: answer without a 'question_id'" in capsys.readouterr().err


def test_score_vqa_single_answer_reference_names_the_line(tmp_path, capsys):
    r = _write_jsonl(tmp_path / "r.jsonl", [{"question_id": 1, "answers": ["a"] * 10}, {"question_id": 2, "answer": "red"}])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 2, "text": "red"}])
    assert main(["score", a, "--references", r, "--metric", "vqa"]) == 2
    assert f"{r}:2: reference 2: VQA accuracy needs at least 2 human answers" in capsys.readouterr().err


def test_score_help_states_reference_format_and_metrics(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("REFS.jsonl", "question_id", "answers", "label", "options", "exact", "vqa", "choice", "yesno",
                 "leave-one-out", "0.3 / 0.6 / 0.9 / 1.0", "F1", "--by"):
        assert text in out, text


def test_score_reads_bom_files_and_refuses_non_utf8(tmp_path, capsys):
    refs = [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "dog"}]
    r = tmp_path / "r.jsonl"
    r.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\n" for x in refs).encode())  # a Windows editor's BOM
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "cat"}, {"question_id": 2, "text": "cow"}])
    assert main(["score", a, "--references", str(r), "--metric", "exact", "--output-json", str(tmp_path / "s.json")]) == 0
    # both references read (the first one is not lost to the BOM): 1 of 2 right
    assert json.loads((tmp_path / "s.json").read_text())["overall"] == {"n": 2, "accuracy": 0.5}
    r.write_bytes(b'{"question_id": 1, "answer": "caf\xe9"}\n')  # Latin-1, not UTF-8
    capsys.readouterr()
    assert main(["score", a, "--references", str(r), "--metric", "exact"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmloom score: error: references file {r}:1: not UTF-8 text") and "Traceback" not in err
