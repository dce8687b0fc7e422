"""Video clips at use time: a model without a video route refuses clips in one line (chat and
generate) instead of answering without them."""

from __future__ import annotations

import json

from mmloom.cli.main import main
from test_inference_cli import workspace  # noqa: F401 - the tiny saved model, images and questions
from video_data import write_clip


def test_a_model_without_video_refuses_clips_in_one_line(workspace, tmp_path, capsys):  # noqa: F811
    clip = write_clip(tmp_path / "clip.mkv", 5)
    assert main(["chat", str(workspace / "model"), "--video", str(clip), "--prompt", "What moves?",
                 "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "video" in err and "Traceback" not in err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "text": "What moves?", "video": "clip.mkv"}) + "\n")
    assert main(["generate", str(workspace / "model"), str(questions), "--output", str(tmp_path / "answers.jsonl"),
                 "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "questions with video but the model has no video" in err and "Traceback" not in err
    assert not (tmp_path / "answers.jsonl").exists()
