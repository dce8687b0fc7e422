"""`mmloom demo`: the whole LLaVA pipeline on synthetic scenes, through mmloom's own commands.

Every step is a real `mmloom ...` command run in a subprocess and printed before it runs, so
the output doubles as a walkthrough to copy. Nothing is written outside the output folder.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmloom.demo.scenes import write_dataset
from mmloom.errors import MmloomError
from mmloom.processing.templates import VICUNA_SYSTEM
from mmloom.tokenization import train_bpe_tokenizer

MARKER = ".mmloom-demo"


@dataclass(frozen=True)
class DemoSize:
    """How much data and training the demo uses."""

    num_train: int
    num_eval: int
    phase1_steps: int
    phase2_steps: int
    batch_size: int


FULL = DemoSize(num_train=8000, num_eval=300, phase1_steps=1000, phase2_steps=800, batch_size=32)
QUICK = DemoSize(num_train=1500, num_eval=60, phase1_steps=300, phase2_steps=150, batch_size=16)

IMAGE_SIZE, PATCH_SIZE = 48, 16  # 3x3 patches: one per scene cell
VISION = {
    "model_type": "clip_vision_model", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "projection_dim": 64,
}
TEXT = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


class Runner:
    """Runs and prints `mmloom` commands with the demo's environment (caches inside OUT)."""

    def __init__(self, out: Path):
        self.out = out
        cache = out / ".cache"
        self.env = {
            **os.environ,
            "MPLCONFIGDIR": str(cache / "matplotlib"),
            "HF_HOME": str(cache / "huggingface"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def mmloom(self, *args: str, capture: bool = False) -> str:
        shown = " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n$ mmloom {shown}", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "mmloom", *map(str, args)],
            env=self.env, text=True, capture_output=capture, check=False,
        )
        if capture:
            print(result.stdout, end="")
        if result.returncode != 0:
            if capture:
                print(result.stderr, file=sys.stderr)
            raise MmloomError(f"demo step failed (exit {result.returncode}): mmloom {shown}")
        return result.stdout if capture else ""


def prepare_output(out: Path) -> None:
    """Start from an empty output folder; only a previous demo's folder is ever cleared."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise MmloomError(f"{out} is not empty and was not made by `mmloom demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by mmloom demo; safe to delete\n")


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def data_config(out: Path, phase: int, msl: int) -> dict:
    return {
        "setup": {"input_dir": str(out / "data" / f"phase{phase}"), "output_dir": str(out / "h5" / f"phase{phase}"),
                  "processes": 2},
        "processor": {"tokenizer_type": str(out / "tokenizer"), "max_sequence_length": msl},
        "dataset": {"num_patches": (IMAGE_SIZE // PATCH_SIZE) ** 2, "image_dir": str(out / "data"),
                    "system_prompt_style": "plain" if phase == 1 else "vicuna_v1"},
    }


def train_config(out: Path, phase: int, size: DemoSize, vocab_size: int, image_token_id: int) -> dict:
    data = {"data_dir": str(out / "h5" / f"phase{phase}"), "img_data_dir": str(out / "data"),
            "image_size": IMAGE_SIZE, "batch_size": size.batch_size, "shuffle": True}
    model: dict = {
        "projector": "mlp2x_gelu", "image_feature_select_layer_idx": -2, "image_feature_select_mode": "patch",
        "image_token_id": image_token_id, "loss_scaling": "num_tokens",
    }
    if phase == 1:
        # Nothing here is pretrained, so phase 1 trains the encoder and the LLM too (LLaVA's
        # phase 1 would freeze both with freeze: ["^image_model", "^text_model"]).
        model |= {"image_model": VISION, "text_model": {**TEXT, "vocab_size": vocab_size}, "freeze": []}
        optimizer = {"lr": 1e-3, "weight_decay": 0.0, "max_gradient_norm": 1.0}
        run = {"max_steps": size.phase1_steps}
    else:
        # LLaVA's phase 2: the vision encoder stays frozen, projector + LLM train.
        model |= {"init_from": str(out / "runs" / "phase1" / "final_model"), "freeze": ["^image_model"]}
        optimizer = {"lr": 1e-3, "weight_decay": 0.0, "max_gradient_norm": 1.0}
        run = {"max_steps": size.phase2_steps}
    return {
        "train_input": data,
        "model": model,
        "optimizer": optimizer,
        "schedule": {"warmup_ratio": 0.05, "decay": "cosine"},
        "runconfig": {**run, "checkpoint_steps": max(run["max_steps"] // 2, 1), "keep_last": 1,
                      "log_steps": max(run["max_steps"] // 10, 1), "seed": 0},
    }


def train_tokenizer(out: Path) -> tuple[int, int]:
    """A byte-level BPE tokenizer trained on the demo's own text, with `<image>` as a special token."""
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"]
    for name in ("phase1/train.jsonl", "phase2/train.jsonl"):
        for line in (out / "data" / name).read_text().splitlines():
            texts += [turn["value"] for turn in json.loads(line)["conversations"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, extra_special_tokens=("<image>",))
    tokenizer.save_pretrained(out / "tokenizer")
    return len(tokenizer), tokenizer.convert_tokens_to_ids("<image>")


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Run the pipeline; returns the accuracy figures (with and without the images)."""
    out = Path(out).resolve()
    size = QUICK if quick else FULL
    start = time.perf_counter()
    prepare_output(out)
    run = Runner(out)

    print("[1/7] synthetic scenes: 1-3 coloured shapes on a 3x3 grid; captions, Q/A and a held-out split")
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0)
    print(f"      {size.num_train} training scenes, {size.num_eval} held-out scenes in {out / 'data'}")

    print("[2/7] a BPE tokenizer trained offline on the demo's text (special token <image>)")
    vocab_size, image_token_id = train_tokenizer(out)
    print(f"      vocabulary {vocab_size}, <image> = {image_token_id}, saved in {out / 'tokenizer'}")

    print("[3/7] HDF5 datasets: phase 1 (plain captions) and phase 2 (vicuna_v1 conversations)")
    for phase, msl in ((1, 64), (2, 192)):
        run.mmloom("data", "build", write_yaml(out / "configs" / f"data_phase{phase}.yaml",
                                               data_config(out, phase, msl)), "--quiet")

    print("[4/7] training: phase 1 (alignment; here the random encoder and LLM train too, since "
          "nothing is pretrained), then phase 2 (instruction tuning, vision encoder frozen)")
    for phase in (1, 2):
        config = write_yaml(out / "configs" / f"train_phase{phase}.yaml",
                            train_config(out, phase, size, vocab_size, image_token_id))
        run.mmloom("train", config, "--model-dir", out / "runs" / f"phase{phase}")
    model = out / "runs" / "phase2" / "final_model"

    print("[5/7] held-out evaluation: greedy answers, exact match per question type")
    questions, references = out / "data" / "eval" / "questions.jsonl", out / "data" / "eval" / "references.jsonl"
    results = {}
    for label, extra in (("with images", []), ("blank images", ["--blank-images"])):
        if label == "blank images":
            print("[6/7] the same evaluation with every image blanked: answers must fall to about chance")
        answers = out / "eval" / f"answers_{'blank' if extra else 'images'}.jsonl"
        scores = answers.with_suffix(".scores.json")
        run.mmloom("generate", model, questions, "--output", answers, "--image-dir", out / "data",
                   "--batch-size", 64, "--max-new-tokens", 6, *extra)
        run.mmloom("score", answers, "--references", references, "--metric", "exact", "--by", "type",
                   "--output-json", scores)
        results[label] = json.loads(scores.read_text())

    print("[7/7] example chats and the loss curves")
    held_out = [json.loads(line) for line in questions.read_text().splitlines()]
    for example in (held_out[0], held_out[len(held_out) // 2], held_out[-1]):
        run.mmloom("chat", model, "--image", out / "data" / example["image"], "--prompt", example["text"],
                   "--max-new-tokens", 8)
    for phase in (1, 2):
        run.mmloom("plot", out / "runs" / f"phase{phase}")

    elapsed = time.perf_counter() - start
    summary = {"seconds": round(elapsed, 1), "quick": quick, **results}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo finished in {elapsed:.0f} s; results in {out / 'demo_results.json'}")
    return summary
