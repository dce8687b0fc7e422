"""Preference tuning against TRL's DPOTrainer (trl 1.16, its own environment): the `hf-llava` export of the same
starting model, trained on the same pairs, gives mmloom's loss and gradient norm at step 1, and after one AdamW
update the same loss, rewards and gradient norm at step 2, for DPO (`sigmoid`), `ipo`, `robust` and RPO (mmloom's
`rpo_alpha`: DPO plus alpha x the chosen answers' mean token NLL; TRL 1.16's `loss_type=["sigmoid", "sft"]` with
`loss_weights=[1, alpha]`, its successor of `rpo_alpha`).

The starting model: a tiny CLIP tower (32 px, patch 8: 16 image tokens) + a 2-layer Llama with a Qwen2-style
byte-level BPE tokenizer and the chatml template, every part trainable (TRL trains the whole LLaVA model). TRL
reads the pairs in its standard vision format: the prompt as mmloom's template renders it (with `<image>`, which
the export's LlavaProcessor expands to the 16 image tokens), each answer ending with the template's end of turn
(`<|im_end|>`, the tokenizer's EOS, so TRL adds none). The ids TRL's collator makes are checked against mmloom's
HDF5 rows first, so that the losses compare the same sequences.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from clients_support import only_in_client_stage, run_client
from llamacpp_support import byte_level_tokenizer, composite, save_mmloom
from PIL import Image

from mmloom.cli.main import main
from mmloom.processing.templates import get_template

pytestmark = only_in_client_stage
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
RUNS = [{"name": "sigmoid", "loss_type": "sigmoid", "beta": 0.1, "trainer_train": True},
        {"name": "ipo", "loss_type": "ipo", "beta": 0.5},
        {"name": "robust", "loss_type": "robust", "beta": 0.2, "label_smoothing": 0.1},
        {"name": "rpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1, "rpo_alpha": 0.5}]
STEPS, LR = 2, 1e-3


def _pairs(root):
    """Four pairs on 32 px pictures of a coloured square: the right colour chosen, a wrong one rejected."""
    names = list(COLOURS)
    pairs = []
    for i, name in enumerate(names):
        arr = np.full((32, 32, 3), 255, np.uint8)
        arr[8:24, 8:24] = COLOURS[name]
        path = root / f"square-{name}.png"
        Image.fromarray(arr).save(path)
        question = "What colour is the square?" if i % 2 == 0 else "Which colour does the shape have?"
        wrong = names[(i + 1) % 4]
        pairs.append({"image": path.name, "prompt": question, "chosen": f"{name.capitalize()}.",
                      "rejected": f"It is {wrong}, I think." if i == 3 else f"{wrong.capitalize()}."})
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tokenizer_dir = byte_level_tokenizer(root / "qwen2-tokenizer", "qwen2")
    model, tokenizer = composite(tokenizer_dir, "llama", "clip", tie_word_embeddings=False)
    folder = save_mmloom(model, tokenizer, "chatml", root / "mmloom", tower="clip")
    export = root / "hf-llava"
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(folder), str(export)]) == 0
    pairs = _pairs(root)
    (root / "pairs").mkdir()
    (root / "pairs" / "pairs.jsonl").write_text("".join(json.dumps({"images": [p["image"]], **{
        k: p[k] for k in ("prompt", "chosen", "rejected")}}) + "\n" for p in pairs))
    build = {"setup": {"input_dir": str(root / "pairs"), "output_dir": str(root / "h5"), "processes": 1},
             "processor": {"tokenizer_type": str(folder), "max_sequence_length": 96},
             "dataset": {"num_patches": 16, "image_dir": str(root), "system_prompt_style": "chatml",
                         "text_only_slots": False, "preference": {"format": "trl"}}}
    (root / "build.yaml").write_text(yaml.safe_dump(build))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet"]) == 0
    template = get_template("chatml")
    trl_pairs = [{"image": str(root / p["image"]), "chosen": p["chosen"] + "<|im_end|>",
                  "rejected": p["rejected"] + "<|im_end|>",
                  "prompt": template.render([{"role": "user", "content": "<image>\n" + p["prompt"]}],
                                            add_generation_prompt=True)} for p in pairs]
    theirs = run_client("trl", "trl_client.py", {"action": "dpo", "folder": str(export), "pairs": trl_pairs,
                                                 "runs": RUNS, "steps": STEPS, "lr": LR, "root": str(root)}, root,
                        timeout=900)
    ours = {}
    for run in RUNS:
        config = {
            "train_input": {"data_dir": str(root / "h5"), "img_data_dir": str(root), "image_size": 32,
                            "batch_size": len(pairs), "micro_batch_size": len(pairs), "shuffle": False},
            "model": {"init_from": str(folder), "precision": "float32", "attn_implementation": "sdpa"},
            "optimizer": {"lr": LR, "weight_decay": 0.0, "max_gradient_norm": 1.0},
            "schedule": {"decay": "constant"},
            "runconfig": {"max_steps": STEPS, "log_steps": 1, "save_final_model": False, "checkpoint_steps": 100},
            "preference": {"loss": run["loss_type"][0] if "rpo_alpha" in run else run["loss_type"], "beta": run["beta"],
                           "label_smoothing": run.get("label_smoothing", 0.0), "rpo_alpha": run.get("rpo_alpha", 0.0)},
        }
        (root / f"{run['name']}.yaml").write_text(yaml.safe_dump(config))
        assert main(["train", str(root / f"{run['name']}.yaml"), "--model-dir", str(root / f"run-{run['name']}")]) == 0
        ours[run["name"]] = [json.loads(line) for line in (root / f"run-{run['name']}" / "metrics.jsonl")
                             .read_text().splitlines()]
    return root, model, theirs, ours


def _mmloom_sequences(root, image_id):
    """mmloom's 2P sequences (chosen rows, then rejected), image slots holding the image id, cut after the answer."""
    import h5py

    out = {"chosen": [], "rejected": []}
    with h5py.File(root / "h5" / "data-00000.h5") as f:
        starts = f["image_start_idx"][:]
        for name, dataset in (("chosen", "data"), ("rejected", "rejected")):
            for i, rows in enumerate(f[dataset][:]):
                ids = rows[0].astype(np.int64).copy()
                ids[starts[i]: starts[i] + 16] = image_id
                last = int(np.nonzero(rows[1])[0].max()) + 1  # the last supervised label
                out[name].append((tuple(ids[: last + 1].tolist()), int(rows[1].sum())))
    return out


def test_trl_collates_the_same_sequences(setup):
    root, model, theirs, _ = setup
    ours = _mmloom_sequences(root, model.placeholder_token_ids["vision"])
    batch = theirs["sigmoid"]
    p = len(ours["chosen"])
    sequences = []
    for row, mask, attention in zip(batch["input_ids"], batch["completion_mask"], batch["attention_mask"], strict=True):
        n = int(attention.sum())
        sequences.append((tuple(row[:n].tolist()), int(mask.sum())))
    assert sorted(sequences[:p]) == sorted(ours["chosen"])
    assert sorted(sequences[p:]) == sorted(ours["rejected"])


def test_same_answer_log_probabilities_as_trl(setup):
    """Without gradient, TRL's log-probabilities of every answer (`compute_ref_log_probs`, its fused LM head on
    its collated batch) are mmloom's (the reference log-probabilities mmloom precomputes)."""
    from safetensors.torch import load_file

    root, _, theirs, _ = setup
    ours = load_file(str(root / "run-sigmoid" / "reference_logps.safetensors"))
    trl = theirs["sigmoid"]["ref_logps"]
    p = trl.numel() // 2
    for side, values in (("chosen", trl[:p]), ("rejected", trl[p:])):
        a, b = sorted(values.tolist()), sorted(ours[side].tolist())
        print(side, "trl", [round(v, 6) for v in a], "mmloom", [round(v, 6) for v in b])
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


LOSS_TOLERANCE, GRAD_NORM_RTOL = 1e-5, 1e-4


@pytest.mark.parametrize("name", [run["name"] for run in RUNS])
def test_same_loss_and_gradient_norm_as_trl(setup, name):
    _, _, theirs, ours = setup
    trl_logs, mine = theirs[name]["logs"], ours[name]
    assert len(trl_logs) == STEPS and len(mine) == STEPS
    for step, (a, b) in enumerate(zip(trl_logs, mine, strict=True), start=1):
        print(f"{name} step {step}: loss trl {a['loss']:.8f} mmloom {b['loss']:.8f}; grad_norm trl {a['grad_norm']:.8f} "
              f"mmloom {b['grad_norm']:.8f}")
        assert abs(a["loss"] - b["loss"]) < LOSS_TOLERANCE, (step, a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=GRAD_NORM_RTOL), (step, a["grad_norm"],
                                                                                      b["grad_norm"])
    start = {"ipo": 1.0}.get(name, math.log(2)) + (0.5 * mine[0]["nll_loss"] if name == "rpo" else 0.0)
    assert abs(mine[0]["loss"] - start) < 1e-6  # the policy is its reference at step 1
    assert mine[1]["rewards/margins"] != 0  # step 2 compares a policy that has left its reference
