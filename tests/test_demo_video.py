"""`mmloom demo --modality video`: the synthetic clips show what their answers say (decoded back
through mmloom's own video loader), and the command takes the modality."""

import random

import numpy as np

from mmloom.cli.main import build_parser
from mmloom.demo.clips import COLOURS, FRAMES, Actor, questions, random_clip, render, write_clip
from mmloom.processing.video import load_video


def centre(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
    """Where `colour` is in a decoded frame (mean pixel position), None when absent."""
    near = np.abs(frame.astype(int) - np.array(COLOURS[colour])).sum(-1) < 60
    ys, xs = np.nonzero(near)
    return (float(xs.mean()), float(ys.mean())) if len(xs) > 20 else None


def test_decoded_clips_show_the_motion_and_the_order(tmp_path):
    rng = random.Random(3)
    for k in range(8):
        actors = random_clip(rng)
        write_clip(tmp_path / f"{k}.mp4", actors)
        frames = load_video(tmp_path / f"{k}.mp4", num_frames=FRAMES)
        assert len(frames) == FRAMES
        mover, still = actors
        answers = {kind: answer for kind, _, answer in questions(actors)}
        seen = [centre(f, mover.colour) for f in frames.array]
        present = [p for p in seen if p is not None]
        assert seen.index(present[0]) in (mover.appears, mover.appears + 1)  # the codec may blur its first frame
        (x0, y0), (x1, y1) = present[0], present[-1]
        moved = {"Left.": x0 - x1, "Right.": x1 - x0, "Up.": y0 - y1, "Down.": y1 - y0}
        assert max(moved, key=moved.get) == answers["direction"] and moved[answers["direction"]] > 10
        first_seen = {a.shape: next(i for i, f in enumerate(frames.array) if centre(f, a.colour)) for a in actors}
        assert answers["first"] == f"A {min(first_seen, key=first_seen.get)}."
        assert still.direction is None and answers["mover"] == f"A {mover.shape}."


def test_a_shape_is_drawn_only_once_it_has_appeared():
    actor = Actor("red", "square", 24.0, 24.0, None, appears=5)
    assert centre(render([actor], 4), "red") is None and centre(render([actor], 5), "red") is not None


def test_demo_command_takes_the_video_modality():
    args = build_parser().parse_args(["demo", "--modality", "video", "--quick"])
    assert (args.modality, args.quick, args.out) == ("video", True, None)


def test_a_tiny_video_demo_runs_every_step(tmp_path, monkeypatch):
    """The whole pipeline on 48 clips and a few steps (accuracy is not asserted here: the README's
    figures come from `make demo-video`): data, tokenizer, HDF5 with video items, both phases with the
    video route, evaluation with and without the frames, chat, plots; nothing outside the output folder."""
    import json
    import os

    from mmloom.demo.steps import DemoSize
    from mmloom.demo.video_pipeline import run_video_demo

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    summary = run_video_demo(out, size=DemoSize(num_train=48, num_eval=8, phase1_steps=4, phase2_steps=4,
                                                batch_size=8))
    for path in ["data/video/eval/000000.mp4", "h5/phase1/data_params.json", "h5/phase2/data-00000.h5",
                 "runs/phase2/final_model/mmloom_processor.json", "eval/answers_video.jsonl",
                 "eval/answers_blank.jsonl", "runs/phase2/loss.png", "demo_results.json"]:
        assert (out / path).exists(), path
    params = json.loads((out / "h5" / "phase2" / "data_params.json").read_text())
    assert params["modalities"]["video"]["clips"] == 48 and params["modalities"]["video"]["token_count"] == {
        "type": "video_frames", "grid": 3, "frame_tokens": 4, "newline": "one_token"}
    config = json.loads((out / "runs" / "phase2" / "final_model" / "config.json").read_text())
    assert config["media"]["video"]["encoder"] == "vision"
    assert summary["with video"]["overall"]["n"] == summary["blank video"]["overall"]["n"] == 8 * 3
    assert sorted(os.listdir(tmp_path)) == ["demo"]
