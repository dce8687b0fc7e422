"""`model.loss_on_supervised_only`: the trainer's chunked supervised-only loss (the default) and the
full-logits loss give the same training run — per-step losses, hence gradients, agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_train_loop import TINY, make_data, overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("fast_loss_data"), n=16)


def _run(data: Path, phase: int, model_dir: Path, fast: bool, monkeypatch) -> dict[int, float]:
    import mmloom.model.multimodal as multimodal
    from mmloom.training.config import load_train_config
    from mmloom.training.loop import run_training

    calls = []
    original = multimodal.supervised_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(multimodal, "supervised_loss", counting)
    sets = ["runconfig.checkpoint_path=null", "runconfig.max_steps=3", "runconfig.log_steps=1",
            "runconfig.checkpoint_steps=100", "runconfig.save_final_model=false",
            f"model.loss_on_supervised_only={str(fast).lower()}"]
    cfg = load_train_config(TINY / f"phase{phase}.yaml", overrides(data, phase, *sets))
    assert cfg.model.loss_on_supervised_only is fast
    run_training(cfg, model_dir)
    assert bool(calls) is fast  # the switch picks the path
    records = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("phase", [1, 2])
def test_supervised_only_loss_gives_the_same_training_run(data, tmp_path, monkeypatch, phase):
    fast = _run(data, phase, tmp_path / "fast", True, monkeypatch)
    full = _run(data, phase, tmp_path / "full", False, monkeypatch)
    assert sorted(fast) == sorted(full) == [1, 2, 3]
    assert fast == pytest.approx(full, rel=1e-5, abs=1e-6)
    assert len(set(fast.values())) > 1  # the runs did update the weights
