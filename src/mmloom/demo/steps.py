"""The steps both `mmloom demo` pipelines (vision: `pipeline.py`, audio: `audio_pipeline.py`) share.

Each step runs real `mmloom ...` commands in a subprocess (:class:`Runner`, which prints them first)
and writes only inside the output folder; the pipelines supply what differs per modality (the
dataset, the encoder, the placeholder token, the evaluation's ablation flag).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmloom.data.records_io import read_jsonl_objects
from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json, write_text
from mmloom.processing.templates import VICUNA_SYSTEM
from mmloom.tokenization import train_bpe_tokenizer

MARKER = ".mmloom-demo"
# torch threads of every training and inference command of the demos: their models are so small that one
# thread is as fast as two on a quiet machine and keeps its speed beside another busy process (two threads
# wait at every operation for the core the other process holds); see benchmarks/demo_threads.py
THREADS = 1
PHASE_LENGTHS = ((1, 64), (2, 192))  # (phase, max_sequence_length of its HDF5 data, in tokens)
TEXT = {  # the tiny random Llama both demos train from scratch
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class DemoSize:
    """How much data and training a demo uses: examples per split, optimizer steps per phase,
    samples per batch, and (training, held-out) examples of two items at once (phase 2 and the
    evaluation only: the vision demo's "two images" question; none in the audio demo)."""

    num_train: int
    num_eval: int
    phase1_steps: int
    phase2_steps: int
    batch_size: int
    num_pairs: tuple[int, int] = (0, 0)


class Runner:
    """Runs and prints `mmloom` commands with the demo's environment (caches inside `out`, hub offline)."""

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

    def mmloom(self, *args: Any, capture: bool = False) -> str:
        """Print and run `mmloom ARGS` (`python -m mmloom`); returns its stdout when `capture`, else "".

        Raises MmloomError naming the command when it exits with a non-zero status."""
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
    """Start from an empty output folder; only a previous demo's folder (holding `MARKER`) is ever
    cleared. Raises MmloomError when `out` is a non-empty folder the demo did not make."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise MmloomError(f"{out} is not empty and was not made by `mmloom demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MARKER, "made by mmloom demo; safe to delete\n")


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` as YAML to `path` (atomically, keys in the given order); returns `path`."""
    write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def train_tokenizer(out: Path, special_tokens: Sequence[str], placeholder: str) -> tuple[int, int]:
    """A byte-level BPE tokenizer (600 tokens + `special_tokens`) trained offline on the demo's own
    text (the vicuna_v1 system prompt and every turn of the two training sets), saved in
    `out/tokenizer`. Returns (vocabulary size, id of `placeholder`)."""
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"]
    for name in ("phase1/train.jsonl", "phase2/train.jsonl"):
        for _, record in read_jsonl_objects(out / "data" / name, what="demo file"):
            texts += [turn["value"] for turn in record["conversations"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, extra_special_tokens=tuple(special_tokens))
    tokenizer.save_pretrained(out / "tokenizer")
    return len(tokenizer), tokenizer.convert_tokens_to_ids(placeholder)


def data_config(out: Path, phase: int, dataset: dict) -> Path:
    """Write the build config of a phase to `out/configs/data_phase{phase}.yaml` and return its path:
    phase 1 with the plain template (captions), phase 2 with vicuna_v1 (conversations), the phase's
    length of `PHASE_LENGTHS`; `dataset` holds the modality's keys of the `dataset` section."""
    config = {
        "setup": {"input_dir": str(out / "data" / f"phase{phase}"),
                  "output_dir": str(out / "h5" / f"phase{phase}"), "processes": 2},
        "processor": {"tokenizer_type": str(out / "tokenizer"), "max_sequence_length": dict(PHASE_LENGTHS)[phase]},
        "dataset": {"system_prompt_style": "plain" if phase == 1 else "vicuna_v1", **dataset},
    }
    return write_yaml(out / "configs" / f"data_phase{phase}.yaml", config)


def build_data(run: Runner, out: Path, dataset: dict) -> None:
    """`mmloom data build` for both phases (:func:`data_config`)."""
    for phase, _ in PHASE_LENGTHS:
        run.mmloom("data", "build", data_config(out, phase, dataset), "--quiet")


def train_config(out: Path, phase: int, size: DemoSize, train_input: dict, model: dict) -> dict:
    """A training config (the seed's sections) for one phase: the phase's HDF5 data plus `train_input`,
    `model`, AdamW at lr 1e-3, 5 % warmup then cosine decay, two checkpoints, ten log lines, `THREADS`
    torch threads."""
    steps = size.phase1_steps if phase == 1 else size.phase2_steps
    return {
        "train_input": {"data_dir": str(out / "h5" / f"phase{phase}"), "batch_size": size.batch_size,
                        "shuffle": True, **train_input},
        "model": model,
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "max_gradient_norm": 1.0},
        "schedule": {"warmup_ratio": 0.05, "decay": "cosine"},
        "runconfig": {"max_steps": steps, "checkpoint_steps": max(steps // 2, 1), "keep_last": 1,
                      "log_steps": max(steps // 10, 1), "seed": 0, "num_threads": THREADS},
    }


def phase_model(out: Path, phase: int, common: dict, phase1: dict, phase2_frozen: list[str]) -> dict:
    """The `model` section of a phase: phase 1 builds the composite from `phase1` (configs of random
    models) and trains everything (nothing is pretrained); phase 2 starts from phase 1's final model with
    the modules matching `phase2_frozen` frozen (LLaVA's phase 2 freezes the encoder)."""
    if phase == 1:
        return {**common, **phase1, "freeze": []}
    return {**common, "init_from": str(out / "runs" / "phase1" / "final_model"), "freeze": phase2_frozen}


def train_phases(run: Runner, out: Path, config: Callable[[int], dict]) -> Path:
    """`mmloom train` phase 1 then phase 2 (`config(phase)` each); returns phase 2's final model folder."""
    for phase in (1, 2):
        path = write_yaml(out / "configs" / f"train_phase{phase}.yaml", config(phase))
        run.mmloom("train", path, "--model-dir", out / "runs" / f"phase{phase}")
    return out / "runs" / "phase2" / "final_model"


def evaluate(run: Runner, out: Path, model: Path, name: str, media: Sequence[Any], max_new_tokens: int,
             extra: Sequence[str] = ()) -> dict:
    """Greedy answers to the held-out questions (`mmloom generate`, batches of 64, `media` names the
    media folder option) into `eval/answers_{name}.jsonl`, scored by exact match per question type
    (`mmloom score`); returns the scores (`overall` and per type: accuracy in [0, 1], n)."""
    answers = out / "eval" / f"answers_{name}.jsonl"
    scores = answers.with_suffix(".scores.json")
    run.mmloom("generate", model, out / "data" / "eval" / "questions.jsonl", "--output", answers, *media,
               "--batch-size", 64, "--max-new-tokens", max_new_tokens, "--threads", THREADS, *extra)
    run.mmloom("score", answers, "--references", out / "data" / "eval" / "references.jsonl", "--metric", "exact",
               "--by", "type", "--output-json", scores)
    return read_json(scores)


def show_examples(run: Runner, out: Path, model: Path, media_key: str) -> None:
    """`mmloom chat` on the first, middle and last held-out questions (each of their `media_key` items
    passed as `--{media_key}`, in order), then `mmloom plot` of both phases' loss curves."""
    held_out = [record for _, record in read_jsonl_objects(out / "data" / "eval" / "questions.jsonl")]
    for example in (held_out[0], held_out[len(held_out) // 2], held_out[-1]):
        items = example[media_key] if isinstance(example[media_key], list) else [example[media_key]]
        media = [arg for item in items for arg in (f"--{media_key}", out / "data" / item)]
        run.mmloom("chat", model, *media, "--prompt", example["text"], "--max-new-tokens", 8, "--threads", THREADS)
    for phase in (1, 2):
        run.mmloom("plot", out / "runs" / f"phase{phase}")


def finish(out: Path, start: float, quick: bool, results: dict, what: str) -> dict:
    """Write `demo_results.json` (seconds since `start` from `time.perf_counter`, `quick`, the
    evaluation results), print where it is and return it."""
    elapsed = time.perf_counter() - start
    summary = {"seconds": round(elapsed, 1), "quick": quick, **results}
    write_json(out / "demo_results.json", summary)
    print(f"\n{what} finished in {elapsed:.0f} s; results in {out / 'demo_results.json'}")
    return summary
