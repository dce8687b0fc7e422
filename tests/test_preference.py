"""The preference phase (DPO): pair records in TRL's, LLaVA's and RLAIF-V's layouts built into the HDF5 extension
with counted bad pairs, TRL's loss definitions, and training: exact normalisation (any split into micro-batches,
packed or padded, one process or two), the reference model (adapter-disabled LoRA = precomputed), resume, cached
features, metrics and plots. The parity with TRL's own DPOTrainer is in tests/clients/test_trl_client.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmloom.cli.main import main
from mmloom.model.preference_loss import PairLogps, preference_losses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "preference.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_pairs(root: Path, n: int = 12) -> Path:
    """n pairs (the right colour chosen over a wrong one, some text-only) + the bad pairs of every skip reason."""
    from mmloom.testing import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(root / "tok")
    (root / "images").mkdir(exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        name, wrong = names[i % 4], names[(i + 1 + i // 4) % 4]
        arr = np.full((32, 32, 3), 255, np.uint8)
        arr[8 + i % 3: 24, 8:24] = COLOURS[name]
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
        layout = i % 4
        if layout == 0:  # TRL conversational
            records.append({"images": [f"img{i}.png"], "prompt": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
                "chosen": [{"role": "assistant", "content": f"{name.capitalize()}."}],
                "rejected": [{"role": "assistant", "content": f"{wrong.capitalize()}."}]})
        elif layout == 1:  # LLaVA's DPO json
            records.append({"id": str(i), "image": f"img{i}.png", "prompt": "What colour is the shape?<image>",
                            "chosen": f"{name.capitalize()}.", "rejected": f"{wrong.capitalize()}. Yes."})
        elif layout == 2:  # RLAIF-V
            records.append({"ds_name": "demo", "image_path": f"img{i}.png", "question": "What colour is the shape?",
                            "chosen": f"{name.capitalize()}.", "rejected": f"It is {wrong}.", "idx": str(i)})
        else:  # text-only, several turns in the prompt
            records.append({"prompt": [{"role": "user", "content": "Say a colour."},
                                       {"role": "assistant", "content": "Red."},
                                       {"role": "user", "content": "Another one?"}],
                            "chosen": f"{name.capitalize()}.", "rejected": "Red."})
    bad = [
        {"images": ["img0.png"], "prompt": "Hi", "chosen": "Same.", "rejected": " Same."},  # identical_answers
        {"images": ["img0.png"], "prompt": "Hi", "chosen": "", "rejected": "x"},  # empty_answer
        {"images": ["missing.png"], "prompt": "Hi", "chosen": "a", "rejected": "b"},  # missing_image
        {"images": ["img0.png"], "prompt": "Hi", "chosen": "a " * 300, "rejected": "b"},  # too_long
        {"prompt": "Hi", "chosen": "a"},  # bad_record
    ]
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + bad))
    cfg = {"setup": {"input_dir": str(root / "src"), "output_dir": str(root / "h5"), "processes": 1,
                     "samples_per_file": 5},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": 160},
           "dataset": {"num_patches": 16, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1",
                       "text_only_slots": False, "preference": {"format": "auto"}}}
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet", "--overwrite"]) == 0
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


def test_build_reads_every_layout_and_counts_bad_pairs(pairs):
    params = json.loads((pairs / "h5" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {"bad_record": 1, "missing_image": 1, "empty_answer": 1,
                                                 "too_long": 1, "identical_answers": 1}
    assert params["preference"]["pairs"] == 12 == params["post-process"]["n_examples"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pairs / "tok")
    answers = []
    for path in sorted((pairs / "h5").glob("data-*.h5")):
        with h5py.File(path) as f:
            assert f["rejected"].shape == f["data"].shape and f["prompt_length"].shape == (f["data"].shape[0],)
            for data, rejected, start in zip(f["data"][:], f["rejected"][:], f["prompt_length"][:], strict=True):
                assert (data[0, :start] == rejected[0, :start]).all()  # one prompt (and image slots) for both
                for rows in (data, rejected):
                    supervised = np.nonzero(rows[1])[0] + 1  # labels of the loss positions
                    assert supervised.min() == start  # only the final answer is supervised
                answers.append((tok.decode(data[0, start:(data[3] == 0).sum()]),
                                tok.decode(rejected[0, start:(rejected[3] == 0).sum()])))
    assert answers[0] == (" Red.</s>", " Green.</s>")  # TRL conversational
    assert answers[1] == (" Green.</s>", " Blue. Yes.</s>")  # LLaVA json
    assert answers[2] == (" Blue.</s>", " It is yellow.</s>")  # RLAIF-V
    assert answers[3] == (" Yellow.</s>", " Red.</s>")  # text-only, the earlier answer "Red." not supervised


def test_losses_are_trl_definitions():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 3 for _ in range(4))
    tc, tr = torch.tensor([3.0, 5, 1, 7, 2], dtype=torch.float64), torch.tensor([4.0, 2, 6, 1, 3], dtype=torch.float64)
    logps = PairLogps(pc, pr, rc, rr, tc, tr)
    beta, eps = 0.3, 0.1
    d = (pc - rc) - (pr - rr)
    sig = torch.nn.functional.logsigmoid
    expected = {
        "sigmoid": -(1 - eps) * sig(beta * d) - eps * sig(-beta * d),
        "ipo": (((pc - rc) / tc - (pr - rr) / tr) - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - eps) * sig(beta * d) + eps * sig(-beta * d)) / (1 - 2 * eps),
        "hinge": torch.relu(1 - beta * d),
    }
    for kind, value in expected.items():
        assert torch.allclose(preference_losses(logps, kind, beta, eps), value), kind
    assert torch.allclose(preference_losses(logps, "sigmoid", beta), -sig(beta * d))  # TRL 1.16's sigmoid


def train(pairs: Path, run: Path, *sets: str) -> list[dict]:
    args = ["train", str(CONFIG), "--model-dir", str(run), "--set", f"train_input.data_dir={pairs / 'h5'}",
            "--set", f"train_input.img_data_dir={pairs / 'images'}", "--set", "runconfig.checkpoint_path=null"]
    for s in ("runconfig.max_steps=4", "schedule.warmup_ratio=0.0", *sets):
        args += ["--set", s]
    assert main(args) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "rewards/margins"), tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert abs(x[key] - y[key]) < tol * max(1.0, abs(y[key])), (x["step"], key, x[key], y[key])


@pytest.fixture(scope="module")
def padded(pairs, tmp_path_factory):
    return train(pairs, tmp_path_factory.mktemp("pref") / "padded", "train_input.micro_batch_size=4")


def test_first_step_is_log2_and_the_model_learns_the_preference(padded):
    assert abs(padded[0]["loss"] - math.log(2)) < 1e-6  # the policy is its reference before any update
    assert padded[0]["rewards/margins"] == 0 and padded[0]["pairs"] == 4
    assert padded[-1]["rewards/margins"] > 0 and padded[-1]["loss"] < math.log(2)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
        padded[-1])


def test_split_and_packing_change_nothing(pairs, padded, tmp_path):
    assert_same(train(pairs, tmp_path / "micro1", "train_input.micro_batch_size=1"), padded)
    assert_same(train(pairs, tmp_path / "packed", "train_input.micro_batch_size=2", "train_input.packing=true"), padded)


@pytest.fixture(scope="module")
def rpo(pairs, tmp_path_factory):
    return train(pairs, tmp_path_factory.mktemp("pref") / "rpo", "train_input.micro_batch_size=4",
                 "preference.rpo_alpha=1.0")


def test_rpo_adds_the_chosen_answers_token_mean_nll(pairs, padded, rpo, tmp_path):
    """rpo_alpha adds alpha x the chosen answers' mean token cross-entropy (TRL's NLL: summed over the step's chosen
    tokens, over their count; not a mean of per-answer means), exact however the step is split."""
    from safetensors.torch import load_file

    whole = train(pairs, tmp_path / "whole", "train_input.batch_size=12", "train_input.micro_batch_size=12",
                  "runconfig.max_steps=1", "preference.rpo_alpha=0.5")
    reference = load_file(str(tmp_path / "whole" / "reference_logps.safetensors"))["chosen"]
    tokens = []
    for path in sorted((pairs / "h5").glob("data-*.h5"), key=lambda p: int(p.stem.split("-")[1])):
        with h5py.File(path) as f:
            tokens += [float(rows[1].sum()) for rows in f["data"][:]]
    tokens = torch.tensor(tokens, dtype=torch.float64)
    nll = float(-reference.sum() / tokens.sum())
    assert abs(nll - float((-reference / tokens).mean())) > 1e-3  # the two normalisations differ on these pairs
    assert abs(whole[0]["nll_loss"] - nll) < 1e-5
    assert abs(whole[0]["loss"] - (math.log(2) + 0.5 * nll)) < 1e-5  # the policy is its reference at step 1
    assert "nll_loss" not in padded[0]  # logged only with rpo_alpha, as TRL did
    assert_same(train(pairs, tmp_path / "micro1", "train_input.micro_batch_size=1", "preference.rpo_alpha=1.0"), rpo,
                keys=("loss", "grad_norm", "rewards/margins", "nll_loss"))
    assert_same(train(pairs, tmp_path / "packed", "train_input.micro_batch_size=2", "train_input.packing=true",
                      "preference.rpo_alpha=1.0"), rpo, keys=("loss", "grad_norm", "rewards/margins", "nll_loss"))
    # the likelihood term holds the chosen answers up where plain DPO lets both log-probabilities fall
    assert rpo[-1]["logps/chosen"] > padded[-1]["logps/chosen"]
    assert rpo[-1]["nll_loss"] < rpo[0]["nll_loss"]


def test_lora_reference_adapters_disabled_equals_precomputed(pairs, tmp_path, capsys):
    lora = ["model.lora={r: 4, alpha: 8, dropout: 0.0}", "model.freeze=[^image_model, ^projector_image_model]",
            "optimizer.lr=5e-3"]
    disabled = train(pairs, tmp_path / "disabled", *lora, "preference.reference=adapters_disabled")
    assert not (tmp_path / "disabled" / "reference_logps.safetensors").exists()  # no second pass, no file
    precomputed = train(pairs, tmp_path / "precomputed", *lora, "preference.reference=precomputed")
    assert_same(disabled, precomputed, tol=1e-4)
    assert disabled[-1]["rewards/margins"] != 0
    refused = ["train", str(CONFIG), "--model-dir", str(tmp_path / "refused")]
    for s in (f"train_input.data_dir={pairs / 'h5'}", f"train_input.img_data_dir={pairs / 'images'}",
              "runconfig.checkpoint_path=null", "model.lora={r: 4, alpha: 8}", "preference.reference=adapters_disabled"):
        refused += ["--set", s]
    assert main(refused) == 2  # the projector trains too: disabling the adapters would not give the starting model
    assert "adapters_disabled gives the starting model back only when" in capsys.readouterr().err


def test_resume_and_cached_features_give_the_same_steps(pairs, padded, tmp_path):
    run = tmp_path / "resumed"
    train(pairs, run, "train_input.micro_batch_size=4", "runconfig.checkpoint_steps=2")
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    assert_same(train(pairs, run, "train_input.micro_batch_size=4", "runconfig.checkpoint_steps=2"), padded)
    written = main(["plot", str(run)])
    assert written == 0 and (run / "rewards.png").is_file() and (run / "logps.png").is_file()
    cache = ["--set", f"train_input.data_dir={pairs / 'h5'}", "--set", f"train_input.img_data_dir={pairs / 'images'}",
             "--set", "runconfig.checkpoint_path=null"]
    assert main(["data", "cache-features", str(CONFIG), *cache]) == 0
    cached = train(pairs, tmp_path / "cached", "train_input.micro_batch_size=4", "train_input.use_cached_features=true")
    assert_same(cached, padded, tol=2e-3)  # features stored in float16


def test_ddp_two_processes_match_one(pairs, padded, tmp_path):
    args = ["train", str(CONFIG), "--model-dir", str(tmp_path / "ddp")]
    for s in (f"train_input.data_dir={pairs / 'h5'}", f"train_input.img_data_dir={pairs / 'images'}",
              "runconfig.checkpoint_path=null", "runconfig.max_steps=4", "schedule.warmup_ratio=0.0",
              "train_input.micro_batch_size=2", "runconfig.distributed=ddp"):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmloom", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    got = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert_same(got, padded, tol=1e-4)


def test_pairs_with_several_images_share_their_slots(tmp_path):
    """A TRL record with two image parts is kept (dataset.multiple_images: keep): both images' slots sit in the
    shared prompt, the file's image items describe both sides, and a batch of P pairs carries each pair's images
    for its chosen and its rejected sequence."""
    from mmloom.data.collate import TrainCollator
    from mmloom.data.hdf5_dataset import HDF5LlavaDataset
    from mmloom.data.preference import PreferenceCollator, PreferencePairs
    from mmloom.processing.image import ImageTransform
    from mmloom.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(COLOURS.values()):
        Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    records = [{"images": [f"{i}.png", f"{i + 1}.png"], "prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "First, then "}, {"type": "image"},
        {"type": "text", "text": "second: which is red?"}]}], "chosen": "The first.", "rejected": "The second."}
        for i in range(2)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"setup": {"input_dir": str(tmp_path / "src"), "output_dir": str(tmp_path / "h5"), "processes": 1},
           "processor": {"tokenizer_type": str(tmp_path / "tok"), "max_sequence_length": 160},
           "dataset": {"num_patches": 16, "image_dir": str(tmp_path / "images"), "system_prompt_style": "vicuna_v1",
                       "preference": {"format": "trl"}}}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet"]) == 0
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())
    assert params["preference"]["pairs"] == 2 and params["image_patch_info"]["images"] == 4
    with h5py.File(tmp_path / "h5" / "data-00000.h5") as f:
        spans, starts = f["image_span"][:], f["prompt_length"][:]
        assert [p.decode() for p in f["image_path"][:]] == ["0.png", "1.png", "1.png", "2.png"]
        assert (spans[:, 1] == 16).all() and (spans[:, 0] + 16 <= np.repeat(starts, 2)).all()  # slots in the prompt
        assert (f["data"][:, 0, :][:, :starts.min()] == f["rejected"][:, 0, :][:, :starts.min()]).all()

    dataset = PreferencePairs(HDF5LlavaDataset(tmp_path / "h5", tmp_path / "images", ImageTransform.from_config(
        None, 32)))
    batch = PreferenceCollator(TrainCollator(4, 3, 16))([dataset[0], dataset[1]])
    assert batch["pairs"] == 2 and batch["input_ids"].shape[0] == 4
    pixels = batch["vision"]["pixel_values"]
    assert pixels.shape[0] == 8  # 2 images x (2 chosen + 2 rejected sequences), in placeholder order
    assert torch.equal(pixels[:4], pixels[4:])  # the rejected sequences see their pair's images
    assert not torch.equal(pixels[0], pixels[1])


def test_llava_records_with_several_images_get_a_placeholder_per_image():
    """LLaVA's DPO json moves `<image>` to the front of the prompt; with a list of images each gets its own
    there, in order (one would be a count mismatch and the pair a skip), and so does a prompt without any."""
    from mmloom.data.preference import parse_preference

    two = parse_preference({"id": "1", "image": ["a.png", "b.png"], "prompt": "<image>\nWhich has more shapes?",
                            "chosen": "The first.", "rejected": "The second."}, "llava")
    assert two.images == ["a.png", "b.png"] and two.prompt[0]["value"] == "<image>\n<image>\nWhich has more shapes?"
    bare = parse_preference({"images": ["a.png", "b.png"], "prompt": "Which?", "chosen": "A.", "rejected": "B."}, "trl")
    assert bare.prompt[0]["value"] == "<image>\n<image>\nWhich?"
    one = parse_preference({"id": "2", "image": "a.png", "prompt": "What colour?\n<image>", "chosen": "Red.",
                            "rejected": "Blue."}, "llava")
    assert one.prompt[0]["value"] == "<image>\nWhat colour?"
