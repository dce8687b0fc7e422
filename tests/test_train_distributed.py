"""2 CPU processes (torchrun, gloo) give the same losses as 1 process with the same global batch,
under DDP and FSDP2; FSDP2 checkpoints save, resume and load."""

from __future__ import annotations

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

from mmloom.cli.main import main
from test_train_loop import SLOW_STEPS, losses, make_data, train_args, weights

SETS = ["runconfig.checkpoint_path=null", "runconfig.max_steps=4", "runconfig.checkpoint_steps=2",
        "runconfig.log_steps=1", "train_input.batch_size=8", "train_input.micro_batch_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("dist_data"), n=16)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dist_runs") / "one_process"
    assert main(train_args(data, 2, run, *SETS)) == 0  # 1 process: 4 micro-batches of 2 per step
    return run


def torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmloom", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stderr[-5000:], proc.stdout[-2000:])  # the ranks' errors first


def assert_same_losses(run: Path, reference: Path) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got, expected)


def two_ranks_match_one_process(args, tmp_path: Path, distributed: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """`mmloom train` with `args(run_dir, *more_sets)` in one process and on 2 gloo ranks (`distributed`): the
    same loss at every step and the same final weights. Returns the one-process final weights."""
    assert main(args(tmp_path / "one")) == 0
    torchrun(args(tmp_path / "two", f"runconfig.distributed={distributed}"), tmp_path)
    got, expected = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got, expected)
    first, second = weights(tmp_path / "one" / "final_model"), weights(tmp_path / "two" / "final_model")
    assert set(first) == set(second)
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=1e-3, atol=1e-5, msg=k)
    return first


def test_ddp_two_processes_match_one(data, reference, tmp_path):
    run = tmp_path / "ddp"
    torchrun(train_args(data, 2, run, *SETS, "runconfig.distributed=ddp"), tmp_path)
    assert_same_losses(run, reference)
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 4
    assert (run / "checkpoint-4" / "rng_state_1.json").exists()


def test_ddp_trains_every_part_without_a_flag(data, tmp_path):
    """Everything trainable, the vision tower read at layer -2 (its last layer and final norm get no
    gradient): DDP on 2 processes, with no find_unused_parameters, gives the losses of one process
    within 1e-5 and the same weights."""
    sets = [*SETS[:1], "runconfig.max_steps=2", *SETS[2:], "model.freeze=[]"]
    reference = tmp_path / "one_process"
    assert main(train_args(data, 2, reference, *sets)) == 0
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmloom",
           *train_args(data, 2, run, *sets, "runconfig.distributed=ddp")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP leaves out" in proc.stdout + proc.stderr and "vision_encoder.module" in proc.stdout + proc.stderr
    got, expected = losses(run), losses(reference)
    assert sorted(got) == sorted(expected) == [1, 2]
    assert all(abs(got[k] - expected[k]) < 1e-5 for k in expected), (got, expected)
    first, second = weights(reference / "final_model"), weights(run / "final_model")
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=1e-4, atol=1e-6)


def test_packed_ddp_matches_one_process(data, reference, tmp_path):
    """Packing on 2 ranks: every rank packs its own micro-batches; losses stay those of 1 process."""
    run = tmp_path / "ddp_packed"
    torchrun(train_args(data, 2, run, *SETS, "runconfig.distributed=ddp", "train_input.packing=true"), tmp_path)
    assert_same_losses(run, reference)


def test_fsdp_two_processes_match_one_and_resume(data, reference, tmp_path):
    run = tmp_path / "fsdp"
    args = train_args(data, 2, run, *SETS, "runconfig.distributed=fsdp")
    torchrun(args, tmp_path)
    assert_same_losses(run, reference)
    first = weights(run / "final_model")
    # drop the last checkpoint: the next launch resumes from checkpoint-2 under FSDP and redoes steps 3-4
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    torchrun(args, tmp_path)
    assert_same_losses(run, reference)
    again = weights(run / "final_model")
    expected = weights(reference / "final_model")
    assert set(again) == set(expected)
    for k in expected:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(again[k], expected[k], rtol=1e-3, atol=1e-5)


def test_fsdp_checkpoint_resumes_on_another_world_size(data, tmp_path):
    """The optimizer state of 2 FSDP ranks (torch.distributed.checkpoint, one shard per rank) loads
    into 1 process (resharded); steps 3-4 match the 2-rank run."""
    run = tmp_path / "fsdp_unused"
    sets = [*SETS, "model.freeze=[]"]
    torchrun(train_args(data, 2, run, *sets, "runconfig.distributed=fsdp"), tmp_path)
    optimizer_files = sorted(p.name for p in (run / "checkpoint-2" / "optimizer").glob("*.safetensors"))
    assert len(optimizer_files) == 2  # each rank wrote its shard
    two_ranks, first = losses(run), weights(run / "final_model")
    # the final model is streamed: two weight files, each written by one rank, and transformers' index
    assert sorted(p.name for p in (run / "final_model").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (run / "final_model" / "model.safetensors.index.json").exists()
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    assert main(train_args(data, 2, run, *sets)) == 0  # distributed: none
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - two_ranks[step]) < 1e-4 * max(1.0, abs(two_ranks[step]))
    again = weights(run / "final_model")
    assert set(again) == set(first)
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-3, atol=1e-5)


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (from /proc: its parent and RANK variable)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_sigterm_on_one_rank_stops_all_ranks_and_ddp_resumes(data, tmp_path):
    """DDP with a trainable encoder whose last layer gets no gradient (no optimizer state for it).
    SIGTERM reaches rank 1 only: both ranks agree at the next step boundary, save the same
    checkpoint and exit 143; the relaunch resumes and ends with the losses of an uninterrupted run."""
    sets = [*SETS[:2], "runconfig.checkpoint_steps=100", *SETS[3:], "model.freeze=[]"]
    reference = tmp_path / "one_process"
    assert main(train_args(data, 2, reference, *sets)) == 0
    run = tmp_path / "preempted"
    args = train_args(data, 2, run, *sets, "runconfig.distributed=ddp")  # no flag: mmloom finds the unused layer
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SLOW_STEPS), "0.5",
           *args]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not ((run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        pid = worker_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    saved = [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and saved[0] != "checkpoint-4", (saved, output[-3000:])
    step = int(saved[0].split("-")[1])
    assert f"stopped by SIGTERM after step {step} of 4" in output
    assert (run / saved[0] / "rng_state_1.json").exists() and not (run / "final_model").exists()
    torchrun(args, tmp_path)
    assert_same_losses(run, reference)
