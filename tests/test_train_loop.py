"""Training through the real CLI on tiny models: phase 1 -> phase 2, exact gradient accumulation,
kill + resume, non-finite loss, eval, plot, LoRA + merge-lora."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmloom.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SLOW_STEPS = Path(__file__).resolve().parent / "slow_steps.py"  # mmloom with slowed-down steps
TINY = ROOT / "configs" / "tiny"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_data(root: Path, n: int = 24) -> Path:
    """Images + LLaVA jsonl -> HDF5 (phase1: plain, MSL 64; phase2: vicuna_v1 with text-only samples, MSL 160)."""
    from mmloom.testing import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(root / "tok")
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    recs1, recs2 = [], []
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        cname, shape = list(COLORS)[i % 4], ("circle", "square")[(i // 4) % 2]
        arr = np.full((32, 32, 3), 255, np.uint8)
        mask = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100) if shape == "circle" else ((abs(yy - 16) < 9) & (abs(xx - 16) < 9))
        arr[mask] = COLORS[cname]
        arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
        recs1.append({"id": str(i), "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"A {cname} {shape}." + " Yes." * (i % 3)}]})
        if i % 6 == 5:  # text-only samples (dummy image in phase 2)
            recs2.append({"id": str(i), "conversations": [
                {"from": "human", "value": "Is there a circle?"}, {"from": "gpt", "value": "Yes." * (1 + i % 2)}]})
        else:
            recs2.append({"id": str(i), "image": f"img{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": f"{cname.capitalize()}." + " Yes." * (i % 3)},
                {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": f"A {shape}."}]})
    for name, recs, style, msl in (("phase1", recs1, "plain", 64), ("phase2", recs2, "vicuna_v1", 160)):
        src = root / f"{name}_jsonl"
        src.mkdir(exist_ok=True)
        (src / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = {"setup": {"input_dir": str(src), "output_dir": str(root / f"{name}_h5"), "processes": 1,
                         "samples_per_file": 10},
               "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": msl},
               "dataset": {"num_patches": 16, "image_dir": str(root / "images"), "system_prompt_style": style}}
        (root / f"{name}_build.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["data", "build", str(root / f"{name}_build.yaml"), "--quiet", "--overwrite"]) == 0
    return root




def start_idx(data: Path, phase: int) -> int:
    return json.loads((data / f"phase{phase}_h5" / "data_params.json").read_text())["image_patch_info"][
        "image_patch_start_idx"]


def overrides(data: Path, phase: int, *sets: str) -> list[str]:
    """--set values pointing a tiny config at the test data."""
    out = []
    for section in ("train_input", "eval_input"):
        out += [f"{section}.data_dir={data / f'phase{phase}_h5'}", f"{section}.img_data_dir={data / 'images'}"]
    return [*out, f"model.image_start_idx={start_idx(data, phase)}", *sets]


def train_args(data: Path, phase: int, model_dir: Path, *sets: str, mode: str = "train") -> list[str]:
    args = ["train", str(TINY / f"phase{phase}.yaml"), "--model-dir", str(model_dir), "--mode", mode]
    for s in overrides(data, phase, *sets):
        args += ["--set", s]
    return args


def losses(model_dir: Path) -> dict[int, float]:
    out = {}
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from mmloom.model.serialization import load_state_dict

    return load_state_dict(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def phase1(data, tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("runs") / "phase1"
    assert main(train_args(data, 1, model_dir, "runconfig.max_steps=16", "runconfig.checkpoint_steps=4",
                           "runconfig.log_steps=1")) == 0
    return model_dir


# ------------------------------------------------------------------------ phase 1 -> phase 2
def test_phase1_trains_projector_only(phase1, data):
    from mmloom.training.builder import build_model
    from mmloom.training.config import load_train_config

    loss = losses(phase1)
    assert sorted(loss) == list(range(1, 17))
    assert np.mean([loss[s] for s in (14, 15, 16)]) < np.mean([loss[s] for s in (1, 2, 3)]) - 0.05
    # checkpoints: trainable-only, keep_last 2, atomic folders only
    names = sorted(p.name for p in phase1.iterdir())
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint-12", "checkpoint-16"]
    assert not [n for n in names if n.startswith(".")]
    ckpt = weights(phase1 / "checkpoint-16")
    assert ckpt and all(k.startswith("vision_encoder.projector.") for k in ckpt)
    for n in ("optimizer", "trainer_state.json", "rng_state_0.json", "manifest.json"):
        assert (phase1 / "checkpoint-16" / n).exists()
    state = json.loads((phase1 / "checkpoint-16" / "trainer_state.json").read_text())
    assert set(state["optimizer"]["params_with_state"]) == set(ckpt)  # no optimizer state for frozen parameters
    from safetensors import safe_open

    optim_keys = set()
    for path in (phase1 / "checkpoint-16" / "optimizer").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            optim_keys |= set(f.keys())
    assert optim_keys == {f"{k}.{item}" for k in ckpt for item in ("step", "exp_avg", "exp_avg_sq")}
    # frozen weights unchanged bit for bit, projector changed
    cfg = load_train_config(TINY / "phase1.yaml")
    init = build_model(cfg, seed=cfg.runconfig.seed).state_dict()
    final = weights(phase1 / "final_model")
    assert set(final) == set(init)
    for k, v in final.items():
        if k.startswith("vision_encoder.projector."):
            assert not torch.equal(v, init[k]), k
            assert torch.equal(v, ckpt[k])
        else:
            assert torch.equal(v, init[k]), k
    # observability
    records = [json.loads(x) for x in (phase1 / "metrics.jsonl").read_text().splitlines()]
    assert {"tokens_per_s", "samples_per_s", "data_wait_share", "lr", "grad_norm"} <= set(records[-1])
    assert (phase1 / "resolved_config.yaml").exists() and list((phase1 / "tensorboard").iterdir())
    assert yaml.safe_load((phase1 / "resolved_config.yaml").read_text())["runconfig"]["max_steps"] == 16
    from mmloom import MultimodalModel

    assert isinstance(MultimodalModel.from_pretrained(phase1 / "final_model"), MultimodalModel)


def test_phase2_from_phase1_train_and_eval(phase1, data, tmp_path):
    from mmloom.training.config import load_train_config
    from mmloom.training.loop import Trainer

    p2 = tmp_path / "phase2"
    sets = [f"runconfig.checkpoint_path={phase1}", "runconfig.max_steps=12", "runconfig.checkpoint_steps=6",
            "runconfig.log_steps=1", "runconfig.eval_steps=6", "runconfig.mfu_peak_flops=1e12"]
    # the phase-2 model starts from phase 1's weights
    cfg = load_train_config(TINY / "phase2.yaml", overrides(data, 2, *sets))
    trainer = Trainer(cfg, p2)
    p1 = weights(phase1 / "final_model")
    start = trainer.base_model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in p1.items())
    trainer_rows = {n: p.requires_grad for n, p in trainer.base_model.named_parameters()}
    assert not any(v for n, v in trainer_rows.items() if n.startswith("vision_encoder.module"))
    assert all(v for n, v in trainer_rows.items() if not n.startswith("vision_encoder.module"))
    assert not trainer.base_model.vision_encoder.module.training and trainer.base_model.language_model.training
    del trainer

    assert main(train_args(data, 2, p2, *sets, mode="train_and_eval")) == 0
    loss = losses(p2)
    assert np.mean([loss[s] for s in (10, 11, 12)]) < np.mean([loss[s] for s in (1, 2, 3)]) - 0.3
    final = weights(p2 / "final_model")
    for k, v in final.items():
        if k.startswith("vision_encoder.module."):
            assert torch.equal(v, p1[k]), k  # frozen: bit for bit
    assert not torch.equal(final["language_model.lm_head.weight"], p1["language_model.lm_head.weight"])
    ckpt = weights(p2 / "checkpoint-12")
    assert not any(k.startswith("vision_encoder.module") for k in ckpt)
    assert any(k.startswith("language_model.") for k in ckpt)
    records = [json.loads(x) for x in (p2 / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert 0 < [r for r in records if "mfu" in r][-1]["mfu"] < 1
    results = json.loads((p2 / "eval_results.json").read_text())
    assert results["step"] == 12 and math.isclose(results["perplexity"], math.exp(results["eval_loss"]))
    # The final model folder carries the data's processor, so chat/generate/convert use it as it is.
    from mmloom.processing.processor import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(p2 / "final_model")
    assert processor.template.name == "vicuna_v1" and processor.num_tokens == {"vision": 16}
    assert processor.encoder_processors["vision"].image_size == 32
    assert MultimodalProcessor.from_pretrained(phase1 / "final_model").template.name == "plain"


def test_eval_mode_and_plot(phase1, data, tmp_path, capsys):
    assert main(train_args(data, 1, phase1, mode="eval")) == 0
    results = json.loads((phase1 / "eval_results.json").read_text())
    assert results["step"] == 16 and results["num_samples"] == 24
    assert math.isclose(results["perplexity"], math.exp(results["eval_loss"]))
    assert 0 <= results["accuracy"] <= 1 and results["num_tokens"] > 0
    assert main(["plot", str(phase1), "--out", str(tmp_path)]) == 0
    for name in ("loss.png", "lr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------- exact gradient accumulation
def test_gradient_accumulation_matches_one_big_batch(data, tmp_path):
    """1 step of micro-batch 2 x 2 accumulation == the whole batch of 4 in one piece (token-level)."""
    from mmloom.training.config import load_train_config
    from mmloom.training.loop import Trainer

    cfg = load_train_config(TINY / "phase2.yaml", overrides(data, 2, "runconfig.checkpoint_path=null"))
    trainer = Trainer(cfg, tmp_path)
    trainer.plan.global_batch = 4
    items = [trainer.train_data.dataset[i] for i in (0, 5, 2, 3)]  # sample 5 is text-only
    collate = trainer.train_data.collate
    counts = [collate([it])["num_loss_tokens"] for it in items]
    assert len(set(counts)) > 2, counts  # different supervised-token counts per sample
    model = trainer.base_model
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        res = trainer.accumulate(micro_batches)
        return res.loss, [p.grad.clone() for p in params]

    loss_a, g_a = grads([collate(items[:2]), collate(items[2:])])
    loss_b, g_b = grads([collate(items)])
    # reference: HF's mean loss over all supervised tokens of the 4 samples, one forward
    model.zero_grad(set_to_none=True)
    full = collate(items)
    out = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"], labels=full["labels"],
                pixel_values=full["vision"]["pixel_values"])
    out.loss.backward()
    g_ref = [p.grad.clone() for p in params]
    ref_loss = float(out.loss.detach())
    assert math.isclose(loss_a, ref_loss, rel_tol=1e-5) and math.isclose(loss_b, ref_loss, rel_tol=1e-5)
    for a, b, r in zip(g_a, g_b, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-7)
    # loss_scaling: batch_size -> sum of token losses / global batch size, split or not
    trainer.cfg.model.loss_scaling = "batch_size"
    loss_c, g_c = grads([collate(items[:2]), collate(items[2:])])
    loss_d, g_d = grads([collate(items)])
    assert math.isclose(loss_c, ref_loss * sum(counts) / 4, rel_tol=1e-5) and math.isclose(loss_c, loss_d, rel_tol=1e-5)
    for c, d, r in zip(g_c, g_d, g_ref, strict=True):
        torch.testing.assert_close(c, r * sum(counts) / 4, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d, c, rtol=1e-4, atol=1e-7)
    # the naive mean of per-micro-batch means would differ
    with torch.no_grad():
        naive = 0.5 * sum(float(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      labels=b["labels"], pixel_values=b["vision"]["pixel_values"]).loss)
                          for b in (collate(items[:2]), collate(items[2:])))
    assert abs(naive - ref_loss) > 1e-3


# ---------------------------------------------------------------------- kill and resume
def test_kill_and_resume_matches_uninterrupted_run(data, tmp_path):
    sets = ["runconfig.checkpoint_path=null", "runconfig.max_steps=10", "runconfig.checkpoint_steps=2",
            "runconfig.log_steps=1", "runconfig.keep_last=3"]
    ref = tmp_path / "uninterrupted"
    assert main(train_args(data, 2, ref, *sets)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(SLOW_STEPS), "0.25", *train_args(data, 2, killed, *sets)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_model").exists() and not (killed / "checkpoint-10").exists()

    assert main(train_args(data, 2, killed, *sets)) == 0  # resumes from the latest checkpoint
    expected, got = losses(ref), losses(killed)
    assert sorted(got) == list(range(1, 11))
    assert [got[s] for s in range(1, 11)] == [expected[s] for s in range(1, 11)]  # step for step, exactly
    a, b = weights(ref / "final_model"), weights(killed / "final_model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run resumes to a no-op
    assert main(train_args(data, 2, killed, *sets)) == 0
    # load_checkpoint_states: all continues another run's checkpoint (weights, optimizer, step, RNG)
    cont = tmp_path / "continued"
    assert main(train_args(data, 2, cont, *sets[1:], f"runconfig.checkpoint_path={ref / 'checkpoint-6'}",
                           "runconfig.load_checkpoint_states=all")) == 0
    got = losses(cont)
    assert sorted(got) == [7, 8, 9, 10] and all(got[s] == expected[s] for s in got)


# -------------------------------------------------------------------------- non-finite loss
def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(data, tmp_path, monkeypatch, capsys):
    from mmloom.training.loop import Trainer

    original = Trainer.forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, denominator):
        calls["n"] += 1
        loss = original(self, batch, denominator)
        return loss * float("nan") if calls["n"] > 2 * self.plan.accum else loss  # step 3 onwards

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)
    run = tmp_path / "nan"
    code = main(train_args(data, 1, run, "runconfig.max_steps=6", "runconfig.checkpoint_steps=2"))
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss" in err and "step 3" in err and "checkpoint-2" in err
    assert (run / "checkpoint-2" / "trainer_state.json").exists() and not (run / "checkpoint-4").exists()
    assert not (run / "final_model").exists()


# ------------------------------------------------------------------------------ LoRA
def test_lora_phase2_and_merge(phase1, data, tmp_path):
    from mmloom import MultimodalModel

    run = tmp_path / "lora"
    assert main(train_args(data, 2, run, f"runconfig.checkpoint_path={phase1}", "runconfig.max_steps=4",
                           "model.lora={r: 4, alpha: 8, dropout: 0.0}", "optimizer.lr=1e-2")) == 0
    ckpt = weights(run / "checkpoint-4")
    assert ckpt and all("lora_" in k or k.startswith("vision_encoder.projector.") for k in ckpt)
    out = tmp_path / "merged"
    assert main(["merge-lora", str(run), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert not config["language_model"].get("peft")
    lora_model = MultimodalModel.from_pretrained(run / "final_model")
    merged = MultimodalModel.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    # the adapters learnt something: merged LLM weights differ from phase 1's
    p1 = weights(phase1 / "final_model")
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], p1[q])
    torch.manual_seed(0)
    ids = torch.tensor([[0] + [4] * 16 + [30, 31, 32, 1]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = lora_model(input_ids=ids, pixel_values=pixels).logits
        b = merged(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ CPU threads
def test_runconfig_sets_the_cpu_threads_of_the_run(data, tmp_path, capsys):
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    try:
        assert main(train_args(data, 1, tmp_path / "run", "runconfig.max_steps=2",
                               f"runconfig.num_threads={target}")) == 0
        assert torch.get_num_threads() == target
        resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
        assert resolved["runconfig"]["num_threads"] == target
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(train_args(data, 1, tmp_path / "run0", "runconfig.num_threads=0")) != 0  # a one-line config error
    assert "runconfig.num_threads" in capsys.readouterr().err
    # inter-op threads are set once per process: a second, different value is named in one line
    script = ("import torch; from mmloom.devices import set_cpu_threads; torch.set_num_interop_threads(1); "
              "torch.ones(2).sum(); set_cpu_threads(None, 1); set_cpu_threads(None, 3, ('a', 'runconfig.x'))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "MmloomError: runconfig.x 3: this process already runs with 1 inter-op" in proc.stderr
