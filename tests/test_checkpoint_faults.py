"""Damaged checkpoints, full disks and preemption: a truncated or missing checkpoint file makes the
resume fall back to the newest complete checkpoint (named), missing optimizer/RNG state is refused
unless `runconfig.resume_weights_only`; a full disk during a checkpoint save or `data build` is one
line naming the path and the space, with nothing partial left; SIGTERM / Ctrl-C save a checkpoint at
the next step boundary and exit 128 + the signal, and the run resumes bit for bit."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmloom.cli.main import main
from test_train_loop import SLOW_STEPS, losses, make_data, train_args, weights
from test_train_resume import assert_same_run

SETS = ["runconfig.checkpoint_path=null", "runconfig.max_steps=6", "runconfig.checkpoint_steps=2",
        "runconfig.log_steps=1", "runconfig.keep_last=null"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("faults_data"), n=16)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults_runs") / "reference"
    assert main(train_args(data, 2, run, *SETS)) == 0
    return run


def copy_checkpoints(reference: Path, folder: Path, steps=(2, 4)) -> Path:
    folder.mkdir(parents=True)
    for step in steps:
        shutil.copytree(reference / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def optimizer_file(checkpoint: Path) -> Path:
    return sorted((checkpoint / "optimizer").glob("*.safetensors"))[0]


DAMAGES = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "truncated optimizer state": (lambda c: truncate(optimizer_file(c)), "optimizer/"),
    "corrupt trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4,'),
                                   "trainer_state.json"),
    "missing RNG state": (lambda c: (c / "rng_state_0.json").unlink(), "rng_state_0.json is missing"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json"),
    "overwritten bytes": (lambda c: (c / "config.json").write_text((c / "config.json").read_text()[::-1]),
                          "config.json differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_falls_back_to_the_previous_one(data, reference, tmp_path, capsys, damage):
    run = copy_checkpoints(reference, tmp_path / "run")
    spoil, words = DAMAGES[damage]
    spoil(run / "checkpoint-4")
    (run / ".checkpoint-6.tmp-partial" / "optimizer").mkdir(parents=True)  # a save killed midway
    (run / ".checkpoint-6.tmp-partial" / "model.safetensors").write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert main(train_args(data, 2, run, *SETS)) == 0
    out = capsys.readouterr().out
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert "skipped checkpoint-4" in out and words in out, out
    assert "resuming from" in out and "checkpoint-2 (step 2)" in out
    assert_same_run(run, reference)  # steps 3-6 redone exactly from checkpoint-2


def test_missing_state_is_refused_unless_weights_only(data, reference, tmp_path, capsys):
    run = copy_checkpoints(reference, tmp_path / "run")
    for step in (2, 4):
        shutil.rmtree(run / f"checkpoint-{step}" / "optimizer")
    capsys.readouterr()
    assert main(train_args(data, 2, run, *SETS)) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "checkpoint-4" in err and "checkpoint-2" in err
    assert "runconfig.resume_weights_only=true" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()
    assert main(train_args(data, 2, run, *SETS, "runconfig.resume_weights_only=true")) == 0
    out = capsys.readouterr().out
    assert "checkpoint-4 (step 4; weights only" in out
    assert sorted(losses(run)) == [5, 6]


# ---------------------------------------------------------------------------- full disk
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("phase", ["weights", "optimizer", "free space check"])
def test_full_disk_during_a_checkpoint_save(data, reference, tmp_path, capsys, monkeypatch, phase):
    from mmloom.model import serialization as ser
    from mmloom.training import checkpoint

    if phase == "weights":
        original = ser.SafetensorsStreamWriter.write

        def write(self, tensor):
            if "checkpoint-4" in str(self.path) and self.position == 1:
                enospc()
            original(self, tensor)

        monkeypatch.setattr(ser.SafetensorsStreamWriter, "write", write)
    elif phase == "optimizer":
        original = checkpoint.write_optimizer_state

        def write_optimizer(directory, *args):
            original(directory, *args)  # files written, then the disk fills up
            if "checkpoint-4" in str(directory):
                enospc()

        monkeypatch.setattr(checkpoint, "write_optimizer_state", write_optimizer)
    else:
        real = checkpoint.free_bytes
        monkeypatch.setattr(checkpoint, "free_bytes", lambda p: 4096 if (Path(p) / "checkpoint-2").exists() else real(p))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(data, 2, run, *SETS)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"cannot write checkpoint {run / 'checkpoint-4'}" in err and "it needs about" in err
    assert "MiB free" in err and "earlier checkpoints are intact" in err
    assert ("4,096" not in err or phase == "free space check")
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    from mmloom.training.checkpoint import verify_checkpoint

    assert verify_checkpoint(run / "checkpoint-2").usable(False)
    monkeypatch.undo()
    assert main(train_args(data, 2, run, *SETS)) == 0  # space again: the run continues from checkpoint-2
    got, expected = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == expected[s] for s in got)
    a, b = weights(reference / "final_model"), weights(run / "final_model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["write error", "free space check"])
def test_full_disk_during_data_build(data, tmp_path, capsys, monkeypatch, how):
    from mmloom.data import build

    cfg = yaml.safe_load((data / "phase2_build.yaml").read_text())
    out = tmp_path / "h5"
    cfg["setup"].update(output_dir=str(out), samples_per_file=4)
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    if how == "write error":
        original = build.write_h5

        def write_h5(path, *args):
            if path.name == "data-00002.h5":  # two files written, then the disk is full
                path.with_name(f".{path.name}.tmp-x").write_bytes(b"half")
                enospc()
            original(path, *args)

        monkeypatch.setattr(build, "write_h5", write_h5)
    else:
        monkeypatch.setattr(build, "free_bytes", lambda p: 1000)
    capsys.readouterr()
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    name = "data-00002.h5" if how == "write error" else "data-00000.h5"
    assert f"cannot write {out / name}: no space left on the device" in err
    assert "this file needs up to" in err and "the whole build needs up to" in err and "nothing of it was kept" in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_at_the_step_boundary_and_resumes_exactly(data, tmp_path, signum):
    """SIGTERM to the trainer; SIGINT to its whole process group as Ctrl-C sends it, data-loader
    workers included (they must not die under the trainer)."""
    sets = [*SETS[:2], "runconfig.checkpoint_steps=100", *SETS[3:]]  # only the last step is a checkpoint step
    if signum == signal.SIGINT:
        sets.append("train_input.num_workers=2")  # same batches, same losses
    reference = tmp_path / "reference"
    assert main(train_args(data, 2, reference, *sets)) == 0
    run = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(SLOW_STEPS), "0.3", *train_args(data, 2, run, *sets)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"loss"') >= 1):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    saved = [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and saved[0] != "checkpoint-6", saved
    step = int(saved[0].split("-")[1])
    assert f"stopped by {signal.Signals(signum).name} after step {step} of 6" in err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert not (run / "final_model").exists()
    assert main(train_args(data, 2, run, *sets)) == 0
    got, expected = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == expected[s] for s in got)
    assert json.loads((run / saved[0] / "trainer_state.json").read_text())["global_step"] == step
    a, b = weights(reference / "final_model"), weights(run / "final_model")
    assert all(torch.equal(a[k], b[k]) for k in a)
