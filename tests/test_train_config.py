"""Training configuration, optimizer groups and schedules (no data, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmloom.errors import MmloomError
from mmloom.training.config import check_config_paths, load_config_dict, load_train_config, parse_train_config
from mmloom.training.optim import lr_factor, param_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIGS if "runconfig" in (yaml.safe_load(p.read_text()) or {})]
LLAVA = ROOT / "configs" / "llava_v1p5"


def test_shipped_configs_exist():
    names = {p.name for p in TRAIN_CONFIGS}
    for size in ("7b", "13b"):
        for phase in (1, 2):
            assert f"params_llava_v1p5_pretrain_{size}_phase{phase}_MSL2K.yaml" in names
    assert {"phase1.yaml", "phase2.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path):
    cfg = load_train_config(path)  # paths are not checked here (placeholders)
    assert cfg.train_input is not None and cfg.train_input.batch_size >= 1


@pytest.mark.parametrize("size,layers,hidden,ffn,heads", [("7b", 32, 4096, 11008, 32), ("13b", 40, 5120, 13824, 40)])
def test_llava_v1p5_hyperparameters(size, layers, hidden, ffn, heads):
    p1 = load_train_config(LLAVA / f"params_llava_v1p5_pretrain_{size}_phase1_MSL2K.yaml")
    p2 = load_train_config(LLAVA / f"params_llava_v1p5_pretrain_{size}_phase2_MSL2K.yaml")
    assert (p1.train_input.batch_size, p1.optimizer.lr, p1.model.image_start_idx) == (256, 1e-3, 1)
    assert (p2.train_input.batch_size, p2.optimizer.lr, p2.model.image_start_idx) == (128, 2e-5, 35)
    assert p1.model.freeze == ["^image_model", "^text_model"] and p2.model.freeze == ["^image_model"]
    assert p2.runconfig.load_checkpoint_states == "model" and p2.runconfig.checkpoint_path
    for cfg in (p1, p2):
        assert cfg.schedule.warmup_ratio == 0.03 and cfg.schedule.decay == "cosine"
        assert cfg.optimizer.weight_decay == 0 and cfg.optimizer.max_gradient_norm == 1.0
        assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.eps == 1e-8
        assert cfg.model.precision == "bfloat16" and cfg.model.projector == "mlp2x_gelu"
        t = cfg.model.text_model
        assert (t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["num_attention_heads"],
                t["vocab_size"]) == (layers, hidden, ffn, heads, 32000)
        v = cfg.model.image_model
        assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"]) == (336, 14, 1024, 24)
        assert cfg.model.image_feature_select_layer_idx == -2 and cfg.model.image_feature_select_mode == "patch"
        # the fastest exact setting measured (benchmarks/README.md): packed rows, per-sample attention
        assert cfg.train_input.packing and not cfg.train_input.group_by_length
        assert cfg.model.attn_implementation == "sdpa" and cfg.model.loss_on_supervised_only


def test_llava_7b_parameter_count_on_meta():
    from transformers import AutoConfig, AutoModelForCausalLM

    t = dict(load_train_config(LLAVA / "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml").model.text_model)
    t.pop("pretrained")
    config = AutoConfig.for_model(t.pop("model_type"), **t)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in llm.parameters())
    assert 6.6e9 < n < 6.8e9  # Llama-2-7B: 6.74B


def _tiny(**changes) -> dict:
    data = load_config_dict(ROOT / "configs" / "tiny" / "phase1.yaml")
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


def test_unknown_key_names_closest_valid_key():
    data = _tiny(runconfig__max_step=3)
    with pytest.raises(MmloomError, match=r"unknown key 'runconfig.max_step'; did you mean 'runconfig.max_steps'"):
        parse_train_config(data)
    data = _tiny(optimizer__weight_decy=0.1)
    with pytest.raises(MmloomError, match=r"did you mean 'optimizer.weight_decay'"):
        parse_train_config(data)
    data = _tiny()
    data["train_inputs"] = data.pop("train_input")
    with pytest.raises(MmloomError, match=r"unknown key 'train_inputs'; did you mean 'train_input'"):
        parse_train_config(data)


def test_bad_values_are_errors():
    with pytest.raises(MmloomError, match="precision"):
        parse_train_config(_tiny(model__precision="fp8"))
    with pytest.raises(MmloomError, match="not both"):
        parse_train_config(_tiny(schedule__warmup_steps=3))  # warmup_ratio is set too
    data = _tiny()
    del data["model"]["text_model"]
    with pytest.raises(MmloomError, match="text_model"):
        parse_train_config(data)
    with pytest.raises(MmloomError, match="model_type"):
        parse_train_config(_tiny(model__image_model={"image_size": 32}))


def test_overrides_and_missing_paths(tmp_path):
    cfg = load_train_config(ROOT / "configs" / "tiny" / "phase1.yaml",
                            ["optimizer.lr=0.5", "runconfig.max_steps=7", f"train_input.data_dir={tmp_path}"])
    assert cfg.optimizer.lr == 0.5 and cfg.runconfig.max_steps == 7
    with pytest.raises(MmloomError, match=r"train_input.img_data_dir: path not found: \./data/tiny/images"):
        check_config_paths(cfg, "train")
    with pytest.raises(MmloomError, match=r"eval_input.data_dir: path not found"):
        check_config_paths(cfg, "eval")
    with pytest.raises(MmloomError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_param_groups_no_decay_and_projector_lr():
    from helpers import vlm

    cfg = parse_train_config(_tiny(optimizer__weight_decay=0.1, optimizer__projector_lr=0.5))
    model = vlm().freeze("^image_model")
    groups = {g["group_name"]: g for g in param_groups(model, cfg.optimizer)}
    assert set(groups) == {"model", "model_no_decay", "projector", "projector_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        pnames = [names[id(p)] for p in group["params"]]
        assert all(not n.startswith("vision_encoder.module") for n in pnames)
        if name.endswith("no_decay"):
            assert group["weight_decay"] == 0 and all(n.endswith("bias") or "norm" in n for n in pnames)
        else:
            assert group["weight_decay"] == 0.1 and all(n.endswith("weight") and "norm" not in n for n in pnames)
        assert group["lr"] == (0.5 if name.startswith("projector") else cfg.optimizer.lr)


def test_schedules():
    # warmup 10 of 110: 0 -> 1 linearly, then cosine to min_ratio
    assert lr_factor(0, 110, 10, "cosine", 0.0) == 0
    assert lr_factor(5, 110, 10, "cosine", 0.0) == 0.5
    assert lr_factor(10, 110, 10, "cosine", 0.0) == 1
    assert math.isclose(lr_factor(60, 110, 10, "cosine", 0.0), 0.5)
    assert math.isclose(lr_factor(110, 110, 10, "cosine", 0.1), 0.1)
    assert math.isclose(lr_factor(60, 110, 10, "linear", 0.0), 0.5)
    assert lr_factor(100, 110, 10, "constant", 0.0) == 1
