"""A learning rate per part: vision encoder, each projector, the LLM and the LoRA adapters, each following the
schedule; LLaVA's option names accepted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmloom.config_io import load_yaml_mapping
from mmloom.errors import MmloomError
from mmloom.training.config import LoraSettings, parse_train_config
from mmloom.training.optim import build_optimizer, build_scheduler, group_lrs, param_groups, part_of

ROOT = Path(__file__).resolve().parents[1]


def _config(**optimizer):
    data = load_yaml_mapping(ROOT / "configs" / "tiny" / "phase2.yaml", "model/optimizer/runconfig")
    data["optimizer"].update(optimizer)
    return parse_train_config(data)


def _lr_by_part(model, cfg) -> dict[str, set[float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, set[float]] = {}
    for group in param_groups(model, cfg.optimizer):
        for p in group["params"]:
            out.setdefault(part_of(names[id(p)]), set()).add(group["lr"])
    return out


def test_each_part_its_lr_and_llava_names():
    from helpers import vlm

    model = vlm()
    cfg = _config(lr=1e-3, mm_projector_lr=2e-3, mm_vision_tower_lr=3e-4, llm_lr=5e-4)
    assert cfg.optimizer.projector_lr == 2e-3 and cfg.optimizer.encoder_lr == 3e-4
    assert _lr_by_part(model, cfg) == {"vision_encoder.module": {3e-4}, "vision_encoder.projector": {2e-3},
                                       "language_model": {5e-4}}
    # part_lr wins over the options by kind; Cerebras names are accepted
    cfg = _config(lr=1e-3, projector_lr=2e-3, part_lr={"projector_image_model": 7e-3})
    assert _lr_by_part(model, cfg)["vision_encoder.projector"] == {7e-3}
    # a projector_lr alone keeps today's groups
    groups = {g["group_name"] for g in param_groups(model, _config(projector_lr=2e-3).optimizer)}
    assert groups == {"model", "model_no_decay", "projector", "projector_no_decay"}


def test_llava_and_own_name_together_and_unknown_part_refused():
    with pytest.raises(MmloomError, match="mm_projector_lr and optimizer.projector_lr are the same setting"):
        _config(mm_projector_lr=1e-3, projector_lr=2e-3)
    from helpers import vlm

    with pytest.raises(MmloomError, match="part_lr names audio_encoder.projector, which this model does not have"):
        param_groups(vlm(), _config(part_lr={"audio_encoder.projector": 1e-3}).optimizer)
    with pytest.raises(MmloomError, match="must be > 0"):
        _config(part_lr={"language_model": 0})


def test_adapters_their_own_lr_and_every_group_follows_the_schedule():
    from helpers import vlm
    from mmloom.model.adapters import add_lora

    model = vlm()
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    model.freeze("^vision_encoder.module")
    cfg = _config(lr=1e-3, projector_lr=2e-3, adapter_lr=4e-3)
    by_part = _lr_by_part(model, cfg)
    assert by_part == {"vision_encoder.projector": {2e-3}, "language_model": {4e-3}}
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule.model_copy(update={"warmup_steps": 2, "warmup_ratio": None,
                                                                            "min_lr": 1e-4}), 1e-3, 10)
    peaks = {g["group_name"]: g["initial_lr"] for g in optimizer.param_groups}
    for step in range(6):
        if step:
            optimizer.step()
            scheduler.step()
        factors = {g["group_name"]: g["lr"] / peaks[g["group_name"]] for g in optimizer.param_groups}
        assert len({round(f, 12) for f in factors.values()}) == 1, factors  # one schedule for every part
    assert math.isclose(next(iter(factors.values())), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    assert set(group_lrs(optimizer)) == {"projector_lr", "adapters_lr"}
    assert all(torch.is_tensor(p) for g in optimizer.param_groups for p in g["params"])
