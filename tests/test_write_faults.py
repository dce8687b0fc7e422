"""A full disk anywhere is one line naming the path and the bytes, with nothing partial that looks
complete: metrics.jsonl and TensorBoard events stop the run at the step boundary after a checkpoint
(the record kept out goes with it and is written on resume), exports and merges keep nothing; a
failure of a distributed run is one line per rank."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmloom.cli.main import main
from test_train_loop import losses, make_data, train_args

SETS = ["runconfig.max_steps=6", "runconfig.checkpoint_steps=2", "runconfig.log_steps=1", "runconfig.keep_last=null"]


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("write_faults_data"), n=16)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("write_faults_runs") / "reference"
    assert main(train_args(data, 1, run, *SETS)) == 0
    return run


def fail_metrics_append(monkeypatch, at: int) -> None:
    """The disk fills up at the `at`-th record appended to metrics.jsonl."""
    original, calls = pathlib.Path.open, {"n": 0}

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode.startswith("a"):
            calls["n"] += 1
            if calls["n"] >= at:
                raise enospc()
        return original(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)


def test_a_full_disk_at_metrics_checkpoints_stops_and_resumes_every_record(data, reference, tmp_path, capsys,
                                                                            monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_metrics_append(patch, at=3)
        capsys.readouterr()
        assert main(train_args(data, 1, run, *SETS)) == 2
    err = one_line(capsys)
    assert f"cannot write {run / 'metrics.jsonl'}: no space left on the device" in err and "MiB free" in err
    assert f"training stopped after step 3: saved {run / 'checkpoint-3'}" in err
    assert sorted(losses(run)) == [1, 2]
    assert main(train_args(data, 1, run, *SETS)) == 0  # space again: resumes from checkpoint-3
    records = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3, 4, 5, 6]  # step 3's record, kept out by the full disk, came with the checkpoint
    assert losses(run) == losses(reference)


def test_when_the_checkpoint_cannot_be_written_either_the_earlier_ones_stay(data, tmp_path, capsys, monkeypatch):
    from mmloom.training import checkpoint

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_metrics_append(patch, at=3)
        patch.setattr(checkpoint, "free_bytes", lambda path: 1000 if (Path(path) / "checkpoint-2").exists() else 10**12)
        capsys.readouterr()
        assert main(train_args(data, 1, run, *SETS)) == 2
    err = one_line(capsys)
    assert "metrics.jsonl" in err and "no checkpoint of it could be written either" in err
    assert f"cannot write checkpoint {run / 'checkpoint-3'}" in err and "the earlier checkpoints are intact" in err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))) == ["checkpoint-2"]


def test_a_full_disk_in_the_tensorboard_thread_is_one_line(data, tmp_path, capsys, monkeypatch):
    from tensorboard.summary.writer import record_writer

    original, calls = record_writer.RecordWriter.write, {"n": 0}

    def write(self, data_):  # runs in TensorBoard's event-writer thread
        calls["n"] += 1
        if calls["n"] > 20:
            raise enospc()
        return original(self, data_)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(data, 1, run, "runconfig.max_steps=30", "runconfig.checkpoint_steps=100",
                           "runconfig.log_steps=1")) == 2
    err = one_line(capsys)
    assert f"cannot write {run / 'tensorboard'}: no space left on the device" in err and "training stopped" in err
    step = int(err.split("training stopped after step ")[1].split(":")[0])
    assert (run / f"checkpoint-{step}").is_dir()


def test_a_full_disk_during_an_export_keeps_nothing(data, reference, tmp_path, capsys, monkeypatch):
    from mmloom.interop import hf_llava

    def save_hf4_tokenizer(*args, **kwargs):  # what the tokenizers library raises: a plain Exception
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002

    monkeypatch.setattr(hf_llava, "save_hf4_tokenizer", save_hf4_tokenizer)
    dst = tmp_path / "export"
    capsys.readouterr()
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(reference / "final_model"), str(dst)]) == 2
    err = one_line(capsys)
    assert f"cannot write {dst}: no space left on the device (it needs about" in err and "nothing of it was kept" in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_merge_lora_keeps_nothing(data, tmp_path, capsys, monkeypatch):
    from mmloom.model import serialization

    run = tmp_path / "lora"
    assert main(train_args(data, 2, run, "runconfig.checkpoint_path=null", "runconfig.max_steps=1",
                           "model.lora={r: 4, alpha: 8, dropout: 0.0}")) == 0

    def save_state_dict(*args, **kwargs):
        raise enospc()

    monkeypatch.setattr(serialization, "save_state_dict", save_state_dict)
    capsys.readouterr()
    assert main(["merge-lora", str(run), str(tmp_path / "merged")]) == 2
    err = one_line(capsys)
    assert f"cannot write {tmp_path / 'merged'}: no space left on the device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    # too little space up front: refused before anything is written
    monkeypatch.setattr("mmloom.outputs.free_bytes", lambda path: 1000)
    assert main(["merge-lora", str(run), str(tmp_path / "merged")]) == 2
    assert "nothing was written" in one_line(capsys)


# ------------------------------------------------------------------------------ distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_dies_leaves_one_line_on_the_others(data, tmp_path):
    """Two DDP ranks (gloo); rank 1 is killed mid-run: rank 0 reports the failure in one line and exits
    1 instead of a traceback (the launcher, torchrun, then reports which rank failed)."""
    run = tmp_path / "run"
    args = train_args(data, 1, run, "runconfig.max_steps=100000", "runconfig.checkpoint_steps=1",
                      "runconfig.keep_last=1", "runconfig.distributed=ddp", "train_input.batch_size=8",
                      "train_input.micro_batch_size=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-m", "mmloom", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not list(run.glob("checkpoint-*")) and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.1)
        assert ranks[0].poll() is None, ranks[0].stderr.read()
        ranks[1].send_signal(signal.SIGKILL)
        _, err = ranks[0].communicate(timeout=120)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert ranks[0].returncode == 1, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("mmloom train: error on rank 0 of 2: another rank stopped"), err


def test_torchs_multi_line_distributed_errors_become_one_line_with_a_hint(capsys):
    from mmloom.cli.train import distributed_failure

    message = ("Expected to have finished reduction in the prior iteration before starting a new one. This error "
               "indicates that your module has parameters that were not used in producing loss.\nYou can enable "
               "unused parameter detection by passing the keyword argument `find_unused_parameters=True`")
    assert distributed_failure(RuntimeError(message), 1, 2) == 1
    err = one_line(capsys)
    assert err.startswith("mmloom train: error on rank 1 of 2: DDP found trainable parameters")
    assert "runconfig.find_unused_parameters: true" in err and "This error" not in err
