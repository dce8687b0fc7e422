"""A shortened `mmloom demo --modality audio` through the same code path: artefacts, and answers
that need the audio (they beat the silenced-audio baseline)."""

import json
import os
import random

import numpy as np

from mmloom.cli.main import build_parser
from mmloom.demo.audio_pipeline import run_audio_demo
from mmloom.demo.sounds import PITCHES, Sound, questions, synthesize
from mmloom.demo.steps import DemoSize

TEST_SIZE = DemoSize(num_train=500, num_eval=40, phase1_steps=120, phase2_steps=120, batch_size=16)


def test_sounds_have_what_the_answers_say():
    rng = random.Random(0)
    beeps = synthesize(Sound("beeps", ["low", "high", "high"]), rng)
    assert 1.0 <= len(beeps) / 8000 <= 2.0
    loud = np.abs(beeps) > 0.1
    starts = np.flatnonzero(loud[1:] & ~loud[:-1])
    bursts = [s for k, s in enumerate(starts) if k == 0 or s - starts[k - 1] > 200]  # >25 ms apart
    assert len(bursts) == 3
    qa = {kind: answer for kind, _, answer in questions(Sound("beeps", ["low", "high"]), rng)}
    assert qa == {"kind": "Beeps.", "count": "Two.", "pitch": "Low.", "order": "Higher."}
    assert {kind for kind, _, _ in questions(Sound("rising"), rng)} == {"kind"}
    assert PITCHES["low"] < PITCHES["middle"] < PITCHES["high"]
    # clip lengths do not tell the answers: drawn independently of the sound
    lengths = {kind: [len(synthesize(Sound(kind, ["low"] * 4 if kind == "beeps" else []), rng)) for _ in range(40)]
               for kind in ("beeps", "noise")}
    assert abs(np.mean(lengths["beeps"]) - np.mean(lengths["noise"])) < 0.15 * 8000


def test_demo_command_takes_the_modality():
    args = build_parser().parse_args(["demo", "--modality", "audio", "--quick"])
    assert (args.modality, args.quick, args.out) == ("audio", True, None)


def test_short_audio_demo_beats_the_silenced_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    summary = run_audio_demo(out, size=TEST_SIZE)
    for path in ["data/phase1/train.jsonl", "data/eval/questions.jsonl", "data/audio/eval/000000.wav",
                 "tokenizer/tokenizer.json", "h5/phase1/data_params.json", "h5/phase2/data-00000.h5",
                 "runs/phase1/final_model/model.safetensors", "runs/phase2/final_model/audio_processor",
                 "runs/phase2/final_model/mmloom_processor.json", "eval/answers_audio.jsonl",
                 "eval/answers_silenced.jsonl", "runs/phase2/loss.png", "demo_results.json"]:
        assert (out / path).exists(), path
    with_audio = summary["with audio"]["overall"]["accuracy"]
    silenced = summary["silenced audio"]["overall"]["accuracy"]
    assert with_audio > silenced + 0.05, (with_audio, silenced)
    assert summary["with audio"]["overall"]["n"] == summary["silenced audio"]["overall"]["n"] > 60
    assert json.loads((out / "demo_results.json").read_text())["with audio"]["overall"]["accuracy"] == with_audio
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # nothing outside the output folder
