"""Resume in every training mode: a run continued from `checkpoint-2` gives the uninterrupted
run's losses and final weights bit for bit (frozen or trainable encoder with parameters that get
no gradient, LoRA, packing; cached features in test_feature_cache.py, DDP / FSDP in
test_train_distributed.py); checkpoints of mmloom's format 1 still resume; a changed config is
reported (what changed, what wins) or refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmloom.cli.main import main
from test_train_loop import losses, make_data, train_args, weights

SETS = ["runconfig.checkpoint_path=null", "runconfig.max_steps=4", "runconfig.checkpoint_steps=2",
        "runconfig.log_steps=1", "runconfig.keep_last=null"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("resume_data"), n=16)


def continue_from(reference: Path, folder: Path, step: int = 2) -> Path:
    """A run folder holding only `reference`'s checkpoint-`step` (what a killed run leaves)."""
    folder.mkdir(parents=True)
    shutil.copytree(reference / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    return folder


def assert_same_run(resumed: Path, reference: Path, first_step: int = 3) -> None:
    """Losses from `first_step` on and the final weights equal, bit for bit."""
    got, expected = losses(resumed), losses(reference)
    assert sorted(got) == list(range(first_step, max(expected) + 1))
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)]
    a, b = weights(reference / "final_model"), weights(resumed / "final_model")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def resume_matches(data: Path, tmp_path: Path, *sets: str, args=train_args) -> Path:
    reference = tmp_path / "reference"
    assert main(args(data, 2, reference, *SETS, *sets)) == 0
    resumed = continue_from(reference, tmp_path / "resumed")
    assert main(args(data, 2, resumed, *SETS, *sets)) == 0
    assert_same_run(resumed, reference)
    return reference


def test_resume_trainable_encoder_with_parameters_without_gradient(data, tmp_path):
    """The demo's phase 1 case (`freeze: []`): with feature layer -2 the last CLIP layer and the
    post-layernorm get no gradient, hence no optimizer state; resuming used to fail on them."""
    reference = resume_matches(data, tmp_path, "model.freeze=[]")
    state = json.loads((reference / "checkpoint-2" / "trainer_state.json").read_text())
    with_state = set(state["optimizer"]["params_with_state"])
    trainable = set(weights(reference / "checkpoint-2"))
    unused = trainable - with_state
    assert any(".encoder.layers.2." in k for k in unused) and any("post_layernorm" in k for k in unused)
    assert any(".encoder.layers.0." in k for k in with_state)


def test_resume_lora(data, tmp_path):
    reference = resume_matches(data, tmp_path, "model.lora={r: 4, alpha: 8, dropout: 0.0}")
    assert any("lora_" in k for k in weights(reference / "checkpoint-2"))


def test_resume_packing(data, tmp_path):
    resume_matches(data, tmp_path, "train_input.packing=true")


# --------------------------------------------------------------------------- format 1
def to_format1(folder: Path, rng_payload=None, optimizer_payload=None) -> None:
    """Rewrite a checkpoint as mmloom wrote it before checkpoint format 2: `optimizer.pt` (the full
    state dict, torch.save) and `rng_state_0.pt` (python / numpy / torch RNG states, torch.save),
    no manifest. A payload object replaces the file's content."""
    import random

    import numpy as np
    from safetensors.torch import load_file

    from mmloom.training.checkpoint import set_rng_state

    state = json.loads((folder / "trainer_state.json").read_text())
    names = state.pop("optimizer")["params_with_state"]
    state.pop("format"), state.pop("config")
    flat = {}
    for path in (folder / "optimizer").glob("*.safetensors"):
        flat.update(load_file(path))
    optim = {"state": {n: {k: flat[f"{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")} for n in names},
             "param_groups": [{"params": names}]}
    torch.save(optimizer_payload if optimizer_payload is not None else optim, folder / "optimizer.pt")
    set_rng_state(json.loads((folder / "rng_state_0.json").read_text()))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng_payload if rng_payload is not None else rng, folder / "rng_state_0.pt")
    shutil.rmtree(folder / "optimizer")
    for name in ("rng_state_0.json", "manifest.json"):
        (folder / name).unlink()
    (folder / "trainer_state.json").write_text(json.dumps(state))


class Payload:
    """A pickle that creates a file when unpickled: what a hostile checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume_runs") / "reference"
    assert main(train_args(data, 2, run, *SETS)) == 0
    return run


def test_format1_checkpoint_resumes_exactly(data, reference, tmp_path):
    resumed = continue_from(reference, tmp_path / "old")
    to_format1(resumed / "checkpoint-2")
    assert main(train_args(data, 2, resumed, *SETS)) == 0
    assert_same_run(resumed, reference)


@pytest.mark.parametrize("where", ["rng", "optimizer"])
def test_pickle_payload_in_a_checkpoint_is_not_run(data, reference, tmp_path, capsys, where):
    marker = tmp_path / "payload-ran"
    resumed = continue_from(reference, tmp_path / "hostile")
    to_format1(resumed / "checkpoint-2", **{f"{where}_payload": Payload(marker)})
    assert main(train_args(data, 2, resumed, *SETS)) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert ("rng_state_0.pt" if where == "rng" else "optimizer.pt") in err and "Traceback" not in err
    # asked for explicitly, the weights alone are used; the payload still does not run
    assert main(train_args(data, 2, resumed, *SETS, "runconfig.resume_weights_only=true")) == 0
    assert not marker.exists()
    assert sorted(losses(resumed)) == [3, 4]


# -------------------------------------------------------------------------- changed config
def test_changed_config_on_resume_is_reported_or_refused(data, reference, tmp_path, capsys):
    resumed = continue_from(reference, tmp_path / "changed")
    capsys.readouterr()
    assert main(train_args(data, 2, resumed, *SETS, "model.freeze=[]")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.freeze" in err and "checkpoint_path" in err

    assert main(train_args(data, 2, resumed, *SETS[:1], "runconfig.max_steps=6", *SETS[2:], "optimizer.lr=1e-3")) == 0
    out = capsys.readouterr().out
    assert "optimizer.lr: 0.002 -> 0.001" in out and "runconfig.max_steps: 4 -> 6" in out
    assert "new values apply from step 3" in out and "schedule now spans 6 steps" in out
    # the new learning rate wins: the schedule of the new config at step 3
    from mmloom.training.config import load_train_config
    from mmloom.training.optim import build_scheduler
    from test_train_loop import TINY

    cfg = load_train_config(TINY / "phase2.yaml", ["optimizer.lr=1e-3"])
    sched = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), cfg.schedule, 1e-3, 6)
    expected_lrs = []
    for _ in range(6):
        expected_lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    records = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(got) == [3, 4, 5, 6]
    assert [got[s] for s in (3, 4, 5, 6)] == pytest.approx(expected_lrs[2:], rel=1e-12)


# ------------------------------------------------------------------------ changed inputs
def test_resume_refuses_rebuilt_data_unless_allowed(data, tmp_path, capsys):
    """A data folder rebuilt with other records (same sample count) under a run: resuming is refused in one
    line that names the way out; allowed explicitly, the run resumes and says so."""
    import yaml

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    config = yaml.safe_load((data / "phase2_build.yaml").read_text())
    config["setup"].update(input_dir=str(copy / "phase2_jsonl"), output_dir=str(copy / "phase2_h5"))
    config["processor"]["tokenizer_type"] = str(copy / "tok")
    (copy / "phase2_build.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "build", str(copy / "phase2_build.yaml"), "--quiet", "--overwrite"]) == 0
    reference = tmp_path / "reference"
    assert main(train_args(copy, 2, reference, *SETS)) == 0
    state = json.loads((reference / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["depends_on"]["data"]["samples"] == 16 and state["depends_on"]["tokenizer"]

    resumed = continue_from(reference, tmp_path / "resumed")
    lines = (copy / "phase2_jsonl" / "part0.jsonl").read_text().splitlines(keepends=True)
    (copy / "phase2_jsonl" / "part0.jsonl").write_text("".join(reversed(lines)))  # other records at each index
    assert main(["data", "build", str(copy / "phase2_build.yaml"), "--quiet", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(train_args(copy, 2, resumed, *SETS)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "training data's files differ" in err
    assert "runconfig.resume_allow_changed=[data]" in err and not (resumed / "checkpoint-4").exists()

    assert main(train_args(copy, 2, resumed, *SETS, "runconfig.resume_allow_changed=[data]")) == 0
    assert "resuming although the training data's files differ" in capsys.readouterr().out
    assert sorted(losses(resumed)) == [3, 4]


def test_dependency_changes_name_each_input():
    from mmloom.training.resume_checks import dependency_changes

    saved = {"data": {"samples": 8, "fingerprint": "a"}, "tokenizer": "t", "start_model": "m"}
    assert dependency_changes(saved, saved) == {} and dependency_changes(None, saved) == {}
    changed = dependency_changes(saved, {"data": {"samples": 9, "fingerprint": "b"}, "tokenizer": "u",
                                         "start_model": "n"})
    assert set(changed) == {"data", "tokenizer", "start_model"} and "9 samples" in changed["data"]
    assert dependency_changes(saved, {**saved, "tokenizer": None}) == {}  # unknown now: not compared
