"""A shortened `mmloom demo` through the same code path: artefacts, and answers that need the image."""

import json
import os

import pytest

from mmloom.demo.pipeline import run_demo
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
