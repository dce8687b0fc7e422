"""A shortened `mmloom demo` through the same code path: artefacts, and answers that need the image;
the demo's two-image examples, as written and as built."""

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.h5_format import read_item_paths, read_items
from mmloom.demo import steps
from mmloom.demo.pipeline import dataset_section, run_demo
from mmloom.demo.scenes import write_dataset
from mmloom.demo.steps import MARKER, prepare_output
from mmloom.errors import MmloomError


def test_quick_demo_runs_the_pipeline_and_beats_the_blank_image_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True)
    for path in ["data/phase1/train.jsonl", "data/phase2/train.jsonl", "data/eval/questions.jsonl",
                 "tokenizer/tokenizer.json", "h5/phase1/data_params.json", "h5/phase2/data-00000.h5",
                 "configs/train_phase2.yaml", "runs/phase1/final_model/model.safetensors",
                 "runs/phase2/final_model/mmloom_processor.json", "runs/phase2/metrics.jsonl",
                 "runs/phase1/loss.png", "runs/phase2/loss.png", "eval/answers_images.jsonl",
                 "eval/answers_blank.jsonl", "demo_results.json"]:
        assert (out / path).exists(), path
    with_images = summary["with images"]["overall"]["accuracy"]
    blank = summary["blank images"]["overall"]["accuracy"]
    assert with_images > blank + 0.05, (with_images, blank)
    assert summary["with images"]["overall"]["n"] == summary["blank images"]["overall"]["n"] > 200
    # `mmloom score --by type` gives every question type its own row, the two-image pairs' included
    groups = summary["with images"]["groups"]
    assert sorted(groups) == ["colour", "count", "position", "presence", "shape", "two images"]
    assert groups["two images"]["n"] == summary["blank images"]["groups"]["two images"]["n"] == 30
    assert json.loads((out / "demo_results.json").read_text())["with images"]["overall"]["accuracy"] == with_images
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # nothing outside the output folder


def test_output_folder_is_cleared_only_when_a_demo_made_it(tmp_path):
    out = tmp_path / "demo"
    prepare_output(out)
    (out / "old.txt").write_text("from the previous run")
    prepare_output(out)  # a second run starts clean
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(MmloomError, match="not empty and was not made by `mmloom demo`"):
        prepare_output(foreign)
    assert (foreign / "thesis.tex").exists()


def shapes_drawn(path) -> int:
    """The number of shapes in a scene image, read from its pixels: grid cells (16x16 of 48x48) holding
    a pixel that is not the background."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(3, 16, 3, 16, 3)
    return int((pixels != 250).any(axis=(1, 3, 4)).sum())


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_image_examples_are_well_formed_and_the_build_keeps_them(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, num_train=30, num_eval=6, seed=0, num_pairs=(40, 10))
    write_dataset(tmp_path / "without", num_train=30, num_eval=6, seed=0)
    phase2 = jsonl(data / "phase2" / "train.jsonl")
    singles, pairs = phase2[:30], phase2[30:]
    # the single scenes are the same with or without pairs
    assert singles == jsonl(tmp_path / "without" / "phase2" / "train.jsonl")
    assert jsonl(data / "phase1" / "train.jsonl") == jsonl(tmp_path / "without" / "phase1" / "train.jsonl")
    questions, references = jsonl(data / "eval" / "questions.jsonl"), jsonl(data / "eval" / "references.jsonl")
    held_out = [(q, r) for q, r in zip(questions, references, strict=True) if q["type"] == "two images"]
    assert len(held_out) == 10 and all(isinstance(q["image"], str) for q in questions[:-10])
    examples = [(r["image"], r["conversations"][1]["value"]) for r in pairs]
    examples += [(q["image"], r["answer"]) for q, r in held_out]
    answers = []
    for images, answer in examples:
        assert len(images) == 2 and len(set(images)) == 2
        first, second = (shapes_drawn(data / image) for image in images)
        assert first != second  # never a tie
        assert answer == ("The first." if first > second else "The second.")
        answers.append(answer)
    assert {answer for answer in answers} == {"The first.", "The second."}
    for record in pairs:  # one human turn: both placeholders at its front, as `mmloom generate` puts them
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        assert record["conversations"][0]["value"] == "<image>\n<image>\nWhich picture has more shapes, the first or the second?"
    assert all("<image>" not in q["text"] for q, _ in held_out)
    assert {r["question_id"] for _, r in held_out} == {f"multi{i}-two-images" for i in range(10)}

    # the demo's phase-2 build (its tokenizer, template and length) keeps every pair, both images in order
    steps.train_tokenizer(tmp_path, ["<image>"], "<image>")
    assert main(["data", "build", str(steps.data_config(tmp_path, 2, dataset_section(tmp_path))), "--quiet"]) == 0
    params = json.loads((tmp_path / "h5" / "phase2" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {}
    assert params["image_patch_info"]["samples"]["several_images"] == 40
    assert params["image_patch_info"]["images"] == 30 + 2 * 40
    built = []
    for path in sorted((tmp_path / "h5" / "phase2").glob("data-*.h5")):
        with h5py.File(path, "r") as h5:
            offsets, spans = read_items(h5, "image", path)
            for i in range(len(offsets) - 1):
                if offsets[i + 1] - offsets[i] == 2:
                    (start1, n1), (start2, n2) = spans[offsets[i]:offsets[i + 1]].tolist()
                    assert n1 == n2 == 9 and start2 >= start1 + n1  # two runs of slots, in order
                    built.append(read_item_paths(h5, "image", int(offsets[i]), int(offsets[i + 1])))
    assert sorted(built) == sorted(record["image"] for record in pairs)
