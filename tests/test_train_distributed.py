"""2 CPU processes (torchrun, gloo) give the same losses as 1 process with the same global batch,
under DDP and FSDP2; FSDP2 checkpoints save, resume and load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmloom.cli.main import main
from test_train_loop import losses, make_data, train_args, weights

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
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])


def assert_same_losses(run: Path, reference: Path) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got, expected)


def test_ddp_two_processes_match_one(data, reference, tmp_path):
    run = tmp_path / "ddp"
    torchrun(train_args(data, 2, run, *SETS, "runconfig.distributed=ddp"), tmp_path)
    assert_same_losses(run, reference)
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 4
    assert (run / "checkpoint-4" / "rng_state_1.json").exists()


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


def test_ddp_resume_with_parameters_without_gradient(data, tmp_path):
    """DDP with a trainable encoder whose last layer gets no gradient (no optimizer state for it):
    a relaunch from checkpoint-2 redoes steps 3-4 exactly."""
    run = tmp_path / "ddp_unused"
    args = train_args(data, 2, run, *SETS, "runconfig.distributed=ddp", "model.freeze=[]",
                      "runconfig.find_unused_parameters=true")
    torchrun(args, tmp_path)
    first, first_losses = weights(run / "final_model"), losses(run)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    torchrun(args, tmp_path)
    assert losses(run) == first_losses
    again = weights(run / "final_model")
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_fsdp_checkpoint_resumes_on_another_world_size(data, tmp_path):
    """The optimizer state of 2 FSDP ranks (torch.distributed.checkpoint, one shard per rank) loads
    into 1 process (resharded); steps 3-4 match the 2-rank run."""
    run = tmp_path / "fsdp_unused"
    sets = [*SETS, "model.freeze=[]"]
    torchrun(train_args(data, 2, run, *sets, "runconfig.distributed=fsdp"), tmp_path)
    optimizer_files = sorted(p.name for p in (run / "checkpoint-2" / "optimizer").glob("*.safetensors"))
    assert len(optimizer_files) == 2  # each rank wrote its shard
    two_ranks, first = losses(run), weights(run / "final_model")
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
