"""One writer per run folder and per data folder (an flock the kernel drops when the process dies):
a second trainer, or an evaluation of a live run, is refused in one line naming the holder's PID and
host; evaluations share the folder and leave a trainer's temporary folders alone. (The shared case
run-folder-lock.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmloom.cli.main import main
from mmloom.outputs import LOCK_NAME, FolderLock
from test_train_loop import losses, make_data, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("lock_data"), n=8)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lock_runs") / "run"
    assert main(train_args(data, 1, run, "runconfig.max_steps=2", "runconfig.checkpoint_steps=1")) == 0
    return run


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_second_writer_and_an_evaluation_are_refused_while_a_trainer_holds_the_folder(data, trained, capsys):
    before = sorted(p.name for p in trained.iterdir())
    with FolderLock(trained, "run folder"):  # what a running `mmloom train` holds
        capsys.readouterr()
        assert main(train_args(data, 1, trained, "runconfig.max_steps=3")) == 2
        err = one_line(capsys)
        assert "in use by" in err and f"PID {os.getpid()} on {socket.gethostname()}" in err
        assert main(train_args(data, 1, trained, mode="eval")) == 2
        assert "in use by" in one_line(capsys)
    assert sorted(p.name for p in trained.iterdir()) == before  # nothing written, the lock file gone
    assert main(train_args(data, 1, trained, mode="eval")) == 0


def test_evaluations_share_the_folder_and_keep_out_of_the_trainers_temporary_folders(data, trained, capsys):
    partial = trained / ".checkpoint-9.tmp-partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"being written")
    with FolderLock(trained, "run folder", shared=True):  # another evaluation
        assert main(train_args(data, 1, trained, mode="eval")) == 0
        assert partial.is_dir()  # an evaluation never touches a trainer's save in progress
        capsys.readouterr()
        assert main(train_args(data, 1, trained, "runconfig.max_steps=3")) == 2
        err = one_line(capsys)
        assert "in use by a reader" in err and str(os.getpid()) in err
    assert main(train_args(data, 1, trained, "runconfig.max_steps=2")) == 0
    assert not partial.exists()  # the trainer, alone again, cleans up its interrupted save


def test_a_lock_left_by_a_killed_process_does_not_block(data, trained, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmloom.outputs import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(trained)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(train_args(data, 1, trained, "runconfig.max_steps=2")) == 2
        assert f"PID {holder.pid}" in one_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert (trained / LOCK_NAME).exists()  # left behind by kill -9, with the dead holder's details
    assert main(train_args(data, 1, trained, "runconfig.max_steps=2")) == 0
    assert not (trained / LOCK_NAME).exists()


def test_a_second_build_into_the_same_folder_is_refused(data, tmp_path, capsys):
    cfg = yaml.safe_load((data / "phase1_build.yaml").read_text())
    cfg["setup"]["output_dir"] = str(tmp_path / "h5")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    with FolderLock(tmp_path / "h5", "data folder"):
        capsys.readouterr()
        assert main(["data", "build", str(tmp_path / "b.yaml"), "--quiet", "--overwrite"]) == 2
        assert f"PID {os.getpid()}" in one_line(capsys)
        assert sorted(p.name for p in (tmp_path / "h5").iterdir()) == [LOCK_NAME]
    assert main(["data", "build", str(tmp_path / "b.yaml"), "--quiet", "--overwrite"]) == 0


def test_two_trainers_on_one_folder(data, tmp_path, capsys):
    """The case: a live run, a second `train` on its folder, an evaluation during the first's checkpoint
    write; the second is refused at once, the first ends cleanly with one record per step."""
    run = tmp_path / "run"
    args = train_args(data, 1, run, "runconfig.max_steps=100000", "runconfig.checkpoint_steps=1",
                      "runconfig.keep_last=2", "runconfig.log_steps=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mmloom", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and not list(run.glob("checkpoint-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        for mode in ("train", "eval"):
            capsys.readouterr()
            start = time.monotonic()
            assert main([*args[:-2], "--mode", mode]) == 2
            err = one_line(capsys)
            assert "in use by `mmloom train" in err and f"PID {first.pid}" in err
            assert time.monotonic() - start < 30
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) == sorted(losses(run))
    last = steps[-1]
    state = json.loads((run / f"checkpoint-{last}" / "trainer_state.json").read_text())
    assert state["global_step"] == last
    assert not (run / LOCK_NAME).exists()
