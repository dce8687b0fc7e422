"""The run folder (`mmloom.training.run_folder`): names, listing, the resume choice, cleanup of
interrupted saves by the writer only, pruning, atomic result files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmloom.errors import MmloomError
from mmloom.training.distributed import DistContext
from mmloom.training.run_folder import (
    TRAINER_STATE,
    RunFolder,
    old_sibling,
    resolve_model_folder,
    temp_sibling,
)


def checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return folder


def test_checkpoints_lists_complete_ones_oldest_first(tmp_path):
    run = RunFolder(tmp_path)
    for step, complete in ((10, True), (2, True), (12, False)):
        checkpoint(tmp_path, step, complete)
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoint-x").mkdir()
    assert [s for s, _ in run.checkpoints()] == [2, 10]  # numeric order; checkpoint-12 is incomplete
    assert [s for s, _ in run.checkpoints(complete_only=False)] == [2, 10, 12]
    assert run.latest_checkpoint() == tmp_path / "checkpoint-10" == run.checkpoint(10)
    assert RunFolder(tmp_path / "absent").checkpoints() == [] and RunFolder(tmp_path / "absent").latest_checkpoint() is None


def test_resolve_model_folder(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 4)
    checkpoint(run, 6, complete=False)
    assert resolve_model_folder(run) == run / "checkpoint-4"  # the newest complete checkpoint
    (run / "final_model").mkdir()
    (run / "final_model" / "config.json").write_text("{}")
    assert resolve_model_folder(run) == run / "final_model"
    assert resolve_model_folder(run / "checkpoint-4") == run / "checkpoint-4"
    with pytest.raises(MmloomError, match="no mmloom model, final_model or checkpoint-N"):
        resolve_model_folder(tmp_path / "empty")


@dataclass
class Check:
    weights: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    name: str = ""

    def usable(self, weights_only: bool) -> bool:
        return not self.weights and (weights_only or not self.state)

    def describe(self, weights_only: bool = False) -> str:
        return f"{self.name}: {'; '.join(self.weights + ([] if weights_only else self.state))}"


def test_resume_point_asks_the_verification_hook_newest_first(tmp_path):
    run = RunFolder(tmp_path)
    assert run.resume_point(lambda folder: Check()) == (None, [])
    for step in (2, 4, 6):
        checkpoint(tmp_path, step, complete=step != 6)
    problems = {"checkpoint-6": Check(weights=["no trainer_state.json"], name="checkpoint-6"),
                "checkpoint-4": Check(state=["optimizer/ is missing"], name="checkpoint-4")}
    asked = []

    def verify(folder: Path) -> Check:
        asked.append(folder.name)
        return problems.get(folder.name, Check(name=folder.name))

    folder, notes = run.resume_point(verify)
    assert folder == run.checkpoint(2) and asked == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
    assert notes == ["skipped checkpoint-6: no trainer_state.json", "skipped checkpoint-4: optimizer/ is missing"]
    folder, notes = run.resume_point(verify, weights_only=True)
    assert folder == run.checkpoint(4) and "resuming from its weights only" in notes[-1]
    problems["checkpoint-2"] = Check(state=["rng_state_0.json is missing"], name="checkpoint-2")
    with pytest.raises(MmloomError, match="no usable checkpoint .*resume_weights_only=true"):
        run.resume_point(verify)


def test_stale_saves_are_removed_by_the_writer_only_and_nothing_else(tmp_path):
    run = RunFolder(tmp_path)
    keep = [checkpoint(tmp_path, 2), tmp_path / ".user_notes", tmp_path / ".checkpoint-notes.txt",
            tmp_path / "resolved_config.yaml"]
    keep[1].mkdir()
    keep[2].write_text("a file")
    keep[3].write_text("x: 1\n")
    stale = [temp_sibling(run.checkpoint(4)), old_sibling(run.checkpoint(2)), old_sibling(run.final_model),
             temp_sibling(run.final_model)]
    assert [p.name for p in stale] == [".checkpoint-4.tmp-partial", ".checkpoint-2.old", ".final_model.old",
                                       ".final_model.tmp-partial"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(MmloomError, match="only the run folder's writer"):
        run.remove_stale_saves()  # no lock held
    ctx = DistContext()
    with run.lock(ctx, "eval"):  # a reader shares the folder with a running trainer
        assert not run.writing
        with pytest.raises(MmloomError, match="only the run folder's writer"):
            run.remove_stale_saves()
    assert all(p.exists() for p in stale)
    with run.lock(ctx, "train"):
        assert run.writing and RunFolder(str(tmp_path)).writing  # another object of the same folder
        assert sorted(run.remove_stale_saves()) == sorted(stale)
    assert not run.writing
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4, 6, 8):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 10, complete=False)
    assert run.prune(2) == [run.checkpoint(2), run.checkpoint(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]


KILLED_WRITE = """
import os, pathlib, signal, sys
from mmloom.training.run_folder import RunFolder
real = pathlib.Path.write_text

def torn(self, text, *args, **kwargs):  # half the new file written, then kill -9
    real(self, text[: len(text) // 2], *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

pathlib.Path.write_text = torn
run = RunFolder(sys.argv[1])
run.write_eval_results({"step": 20, "eval_loss": 0.5}) if sys.argv[2] == "eval" else run.write_resolved_config("b: 2\\n" * 100)
"""


@pytest.mark.parametrize("which", ["eval", "config"])
def test_a_killed_result_write_leaves_the_earlier_file(tmp_path, which):
    run = RunFolder(tmp_path)
    run.write_eval_results({"step": 10, "eval_loss": 1.5})
    run.write_resolved_config("a: 1\n")
    before = {p.name: p.read_bytes() for p in (run.eval_results, run.resolved_config)}
    assert json.loads(before["eval_results.json"]) == {"step": 10, "eval_loss": 1.5}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path), which], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in (run.eval_results, run.resolved_config)} == before
