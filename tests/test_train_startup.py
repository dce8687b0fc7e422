"""Start-up on the meta device (`model_loading.build_base_model`): the model a run starts from is the
one a one-process build on the CPU gives, tensor for tensor and random state included, in one
process, under FSDP2 (2 ranks, gathered) and under DDP (2 ranks), from every kind of source:
inline configs (random weights), HF component folders, an mmloom folder (`model.init_from`), start
weights (`runconfig.checkpoint_path`, plain or PEFT), LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmloom.errors import MmloomError
from mmloom.model import adapters
from mmloom.model import serialization as ser
from mmloom.model.multimodal import MultimodalConfig
from mmloom.training import builder, model_loading
from mmloom.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
PHASE2 = ROOT / "configs" / "tiny" / "phase2.yaml"
LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"


def with_folders(sets: list[str], folders: dict[str, Path]) -> list[str]:
    out = []
    for s in sets:
        for name, path in folders.items():
            s = s.replace(f"<{name}>", str(path))
        out.append(s)
    return out


def config(*sets: str):
    return load_train_config(PHASE2, ["runconfig.checkpoint_path=null", *sets])


def load_folder(model, folder: Path) -> None:
    config = MultimodalConfig.load(folder)
    model.load_weights(ser.load_state_dict(folder), tied_weights=config.tied_weights, strict=False)


def cpu_build(cfg, start: Path | None = None):
    """The starting model as mmloom built it before meta-device start-up: everything on the CPU in
    one process (transformers' `from_pretrained`, `MultimodalModel.from_pretrained`, whole state dicts)."""
    model = builder.build_model(cfg, seed=cfg.runconfig.seed)
    peft = start is not None and adapters.has_adapters(start)
    if start is not None and not peft:
        load_folder(model, start)
    if cfg.model.freeze:
        model.freeze(cfg.model.freeze)
    if cfg.model.lora is not None:
        adapters.add_lora(model, cfg.model.lora)
    if peft:
        load_folder(model, start)
    return model


def assert_same_start(expected, got_state: dict, got_rng: torch.Tensor, got_trainable: list[str], rng: torch.Tensor):
    state = expected.state_dict()
    assert set(state) == set(got_state)
    for name, tensor in state.items():
        assert torch.equal(tensor, got_state[name]), name  # bit for bit
    assert torch.equal(rng, got_rng)  # dropout and anything else random continue as before
    assert got_trainable == [n for n, p in expected.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """HF component folders and mmloom folders of the tiny phase-2 model (other random weights)."""
    root = tmp_path_factory.mktemp("startup_folders")
    model = builder.build_model(config(), seed=7)
    model.encoders["vision"].module.save_pretrained(root / "clip")
    model.language_model.save_pretrained(root / "llama")
    model.save_pretrained(root / "mmloom")
    lora = builder.build_model(config(), seed=8)
    adapters.add_lora(lora, config(LORA).model.lora)
    lora.save_pretrained(root / "peft", trainable_only=True)
    return {"clip": root / "clip", "llama": root / "llama", "mmloom": root / "mmloom", "peft": root / "peft"}


CASES = {
    "inline": ([], None),
    "inline_lora": ([LORA], None),
    "hf_folders": (["model.image_model=<clip>", "model.text_model=<llama>"], None),
    "hf_folders_lora": (["model.image_model=<clip>", "model.text_model=<llama>", LORA], None),
    "init_from": (["model.init_from=<mmloom>"], None),
    "init_from_lora": (["model.init_from=<mmloom>", LORA], None),
    "start_weights": (["model.image_model=<clip>"], "mmloom"),
    "peft_start": ([LORA], "peft"),
}


@pytest.mark.parametrize("case", CASES)
def test_one_process_start_is_the_cpu_build(case, folders):
    sets, start = CASES[case]
    cfg = config(*with_folders(sets, folders))
    start = folders[start] if start else None
    expected = cpu_build(cfg, start)
    rng = torch.get_rng_state()
    torch.manual_seed(123)  # the build seeds itself
    got = model_loading.build_base_model(cfg, start)
    assert_same_start(expected, got.state_dict(), torch.get_rng_state(),
                      [n for n, p in got.named_parameters() if p.requires_grad], rng)
    assert {n: b for n, b in expected.named_buffers()}.keys() == {n: b for n, b in got.named_buffers()}.keys()
    for name, buffer in expected.named_buffers():  # rotary frequencies, position ids: not in the state dict
        assert torch.equal(buffer, dict(got.named_buffers())[name]), name
    assert model_loading.frozen_fingerprint(got) == model_loading.frozen_fingerprint(expected)


def test_pretrained_parts_are_built_without_their_weights(folders):
    """The plan builds HF folders' parts on the meta device and records every tensor's file; only the
    random projector holds values."""
    cfg = config(f"model.image_model={folders['clip']}", f"model.text_model={folders['llama']}")
    plan = builder.StartPlan()
    model = builder.build_model(cfg, plan=plan)
    sources = plan.sources.by_name(model)
    held = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    assert held and all(n.startswith("vision_encoder.projector.") for n in held)
    assert set(sources) == {n for n, p in model.named_parameters() if p.device.type == "meta"}
    assert sources["language_model.lm_head.weight"].path.parent == folders["llama"]
    assert not plan.notes


def test_folder_that_needs_transformers_is_loaded_by_it(folders, tmp_path, capsys):
    """An HF folder whose tensors do not cover the model (here: one removed, which transformers
    initialises at random) is loaded by `from_pretrained` as before, with a note: same start."""
    llama = tmp_path / "llama"
    llama.mkdir()
    for item in folders["llama"].iterdir():
        (llama / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(llama / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(llama / "model.safetensors"), metadata={"format": "pt"})
    cfg = config(f"model.text_model={llama}")
    expected = cpu_build(cfg)
    rng = torch.get_rng_state()
    got = model_loading.build_base_model(cfg)
    assert "loaded whole by transformers" in capsys.readouterr().out
    assert_same_start(expected, got.state_dict(), torch.get_rng_state(),
                      [n for n, p in got.named_parameters() if p.requires_grad], rng)


def test_start_weights_that_do_not_fit_are_refused_before_loading(folders):
    cfg = config("model.text_model.hidden_size=64", "model.text_model.intermediate_size=128")
    with pytest.raises(MmloomError, match="do not fit the configured model: size mismatch for"):
        model_loading.build_base_model(cfg, folders["mmloom"])


@pytest.mark.parametrize("case", ["hf_folders_lora", "start_weights"])
def test_two_ranks_start_from_the_cpu_build(case, folders, tmp_path):
    """FSDP2 (2 gloo ranks, shards filled from rank 0) and DDP (rank 0 reads, broadcast) start
    from exactly the one-process CPU build: every tensor, the random state, the fingerprint."""
    sets, start = CASES[case]
    sets = ["runconfig.checkpoint_path=null", *with_folders(sets, folders)]
    if start:
        sets.append(f"runconfig.checkpoint_path={folders[start]}")
    cfg = load_train_config(PHASE2, sets)
    expected = cpu_build(cfg, folders[start] if start else None)
    rng = torch.get_rng_state()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "startup_worker.py"), str(PHASE2), str(tmp_path), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    fingerprint = model_loading.frozen_fingerprint(expected)
    full = expected.state_dict()
    for mode in ("fsdp", "ddp"):
        for rank in (0, 1):
            info = json.loads((tmp_path / f"{mode}_{rank}.json").read_text())
            state = load_file(str(tmp_path / f"{mode}_{rank}.safetensors"))
            assert_same_start(expected, state, torch.tensor(info["rng"], dtype=torch.uint8), info["trainable"], rng)
            assert info["fingerprint"] == fingerprint
            assert bool(info["shards"]) == (mode == "fsdp")
            for name, shape in info["shards"].items():  # FSDP2: each rank holds its rows of every tensor
                rows = -(-full[name].shape[0] // 2)
                assert shape[0] == min(rows, full[name].shape[0] - rank * rows), name


def test_frozen_fingerprint_is_the_one_checkpoints_recorded():
    """Trainable-only checkpoints written before meta-device start-up recorded sums of `p.double()`
    in this order: the fingerprint gives the same string, so they still resume."""
    model = builder.build_model(config(), seed=3)
    model.freeze(["^image_model", "^text_model"])
    total, absolute, count = 0.0, 0.0, 0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            total += float(p.detach().double().sum())
            absolute += float(p.detach().double().abs().sum())
            count += p.numel()
    assert model_loading.frozen_fingerprint(model) == f"{count}:{total:.10e}:{absolute:.10e}"


def test_one_process_start_with_a_whisper_folder_and_lora_on_the_encoder(tmp_path):
    """The audio encoder from a WhisperForConditionalGeneration folder (keys under `model.`, the
    decoder dropped), LoRA on it and on the LLM: the same start as the CPU build."""
    import yaml
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    data = yaml.safe_load((PHASE2.parent / "audio_vision.yaml").read_text())
    audio = {k: v for k, v in data["model"]["encoders"]["audio"]["model"].items() if k != "model_type"}
    torch.manual_seed(5)
    WhisperForConditionalGeneration(WhisperConfig(**audio)).save_pretrained(tmp_path / "whisper")
    data["model"]["encoders"]["audio"]["model"] = str(tmp_path / "whisper")
    data["model"]["lora"] = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"],
                             "parts": ["text_model", "audio"]}
    data["runconfig"]["checkpoint_path"] = None
    from mmloom.training.config import parse_train_config

    cfg = parse_train_config(data)
    expected = cpu_build(cfg)
    rng = torch.get_rng_state()
    plan = builder.StartPlan()
    builder.build_model(cfg, plan=plan)
    assert not plan.notes  # the folder's tensors were mapped, not loaded by transformers
    got = model_loading.build_base_model(cfg)
    assert_same_start(expected, got.state_dict(), torch.get_rng_state(),
                      [n for n, p in got.named_parameters() if p.requires_grad], rng)


def test_one_process_start_from_a_dual_tower_clip_folder(tmp_path):
    """`image_model` a whole CLIPModel folder (as openai/clip-vit-large-patch14-336 is): its vision
    tower's tensors are mapped from the folder (the text tower's are not read), same start."""
    from transformers import CLIPConfig, CLIPModel

    vision = config().model.image_model
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "pretrained")}
    torch.manual_seed(9)
    CLIPModel(CLIPConfig(vision_config=vision, text_config={"hidden_size": 16, "intermediate_size": 32,
                                                              "num_hidden_layers": 1, "num_attention_heads": 2},
                         projection_dim=vision["projection_dim"])).save_pretrained(tmp_path / "clip")
    cfg = config(f"model.image_model={tmp_path / 'clip'}")
    expected = cpu_build(cfg)
    rng = torch.get_rng_state()
    plan = builder.StartPlan()
    model = builder.build_model(cfg, plan=plan)
    assert not plan.notes
    assert {s.key for s in plan.sources.by_name(model).values()} >= {"vision_model.post_layernorm.weight"}
    got = model_loading.build_base_model(cfg)
    assert_same_start(expected, got.state_dict(), torch.get_rng_state(),
                      [n for n, p in got.named_parameters() if p.requires_grad], rng)


def test_prefix_rule_without_transformers_renamings():
    """Where transformers has no renaming rules to offer, checkpoint keys still map with the
    base-model prefix added or removed, as `from_pretrained` does."""
    from mmloom.model.meta_init import _prefixed

    state = {"layers.0.weight": None, "lm_head.weight": None}
    assert _prefixed("model.layers.0.weight", "model", state) == "layers.0.weight"
    assert _prefixed("lm_head.weight", "model", state) == "lm_head.weight"
    assert _prefixed("other.weight", "model", state) == "other.weight"  # not in the model: ignored by the caller
    assert _prefixed("norm.weight", "model", {"model.norm.weight": None}) == "model.norm.weight"
