"""The recipe's third phase on the vision demo: preference tuning (DPO with RPO's likelihood term) of the demo's
phase-2 model.

    mmloom demo --out runs/demo                       # (or --quick) phases 1 and 2, evaluated
    python examples/preference_phase.py runs/demo     # phase 3 on runs/demo, evaluated before and after

Every training question of one type (`--type`, default: the demo's weakest type with the image, read from its
evaluation, the relational `position` question and the two-image question excepted) from the demo's phase-2
conversations becomes a preference pair: the right answer chosen; rejected, the phase-2 model's own answer (`mmloom generate` on the
training questions) where it is wrong, as on-policy preference data (RLAIF-V, POVID) is made, and a random wrong
answer of the same type where it is right (kept rather than dropped, so the chosen answers keep every shape, not
only those the model misses; `--rejected random`: always a random wrong answer). As many pairs of the other
question types, drawn at random, are made the same way (`--replay 1`), so that the other types are not
forgotten. The pairs are written in LLaVA's DPO json (`image`, `prompt`, `chosen`, `rejected`); then, through
mmloom's own commands: `data build` with `dataset.preference`, `train` with a `preference` section
(`sigmoid`, `beta`, `rpo_alpha`: DPO plus `rpo_alpha` x the chosen answers' token NLL) from
`runs/phase2/final_model` (vision encoder frozen; the reference log-probabilities of the phase-2 model computed
once before the first step), and `generate` + `score` on the demo's held-out questions, per question type, with
the images and with every image blanked. Everything is written to a new folder (`--out`, default DEMO/phase3).
`--sft` runs the natural control instead: the same steps of plain instruction tuning on the same questions with
their right answers (no rejected answers, no reference).

Measured with the defaults below (100 steps of 16 pairs, lr 1e-3, beta 0.5, rpo_alpha 1.0, own rejected answers,
replay 1, the two-image question's pairs replayed too) on this revision's `mmloom demo --quick` model (286 held-out
questions; the weakest type is `shape`, 56 questions; 1355 shape pairs and 1355 of the other types), 2-core CPU
shared with other jobs:

    type        phase 2   phase 3   phase 3, image blanked   control (--sft)   control, blanked
    colour        23.5%     33.3%     21.6%                     21.6%             21.6%
    count        100.0%    100.0%     36.7%                     98.3%             36.7%
    position      48.3%     51.7%     51.7%                     51.7%             51.7%
    presence      48.3%     53.3%     48.3%                     55.0%             51.7%
    shape         19.6%     46.4%     46.4%                     46.4%             33.9%
    two images    56.7%     56.7%      0.0%                     60.0%             43.3%
    overall       50.0%     58.4%     36.0%                     56.6%             38.8%

It does not do what it is for. Shape rises from 19.6% to 46.4%, but only because the model's one answer moves
from "Circle." (to all 56 shape questions) to "Square." (to all 56, the most common shape): with the images
blanked it scores the same. Colour rises from images (33.3% against 21.6% blanked) and overall by 8.4 points,
about as much as the control (the same steps of instruction tuning on the chosen answers: 56.6%). On the full
demo's phase-2 model (`make demo`, 1403 questions; weakest type colour, 6785 pairs and as many of the others) it
lowers accuracy: colour 76.2% -> 73.8%, presence 90.7% -> 73.0%, overall 89.0% -> 84.4% (blanked 35.0%).

On the quick demo of the revision before the two-image question (256 questions, phase 2 at shape 25.0%,
overall 43.8%), the same defaults gave shape 42.9% (33.9% blanked: partly read from the images) and overall
46.9%, and the variants (100 steps of 16, phase-3 accuracy with the images) were:

    rejected  rpo_alpha  beta  lr    replay  colour  count  position presence  shape overall
    random    0          0.1   2e-4  0        29.4%  48.3%   48.3%   51.7%    33.9%  42.2%
    own       0          0.1   1e-3  0         0.0%   0.0%    0.0%    0.0%    19.6%   4.3%
    own       1.0        0.1   2e-4  0        39.2%  55.0%   48.3%   48.3%    35.7%  45.3%
    own       1.0        0.1   5e-4  0        21.6%  48.3%   37.9%   48.3%    42.9%  40.6%
    own       1.0        0.1   1e-3  0         0.0%   0.0%    3.4%   43.3%    62.5%  24.2%
    own       1.0        0.1   1e-3  1        25.5%  53.3%   51.7%   51.7%    42.9%  44.9%
    own       1.0        0.5   1e-3  1        39.2%  50.0%   51.7%   51.7%    42.9%  46.9%   (the defaults)
    random    1.0        0.5   1e-3  1        52.9%  53.3%   51.7%   51.7%    28.6%  47.3%
    --sft                      2e-4  0        39.2%  56.7%   48.3%   48.3%    23.2%  43.0%
    --sft                      1e-3  0         0.0%   1.7%   17.2%   45.0%    62.5%  26.6%
    --sft                      1e-3  1        52.9%  53.3%   51.7%   51.7%    42.9%  50.4%

What each part did there: plain DPO (rpo_alpha 0) lowered both answers' log-probabilities and, at a learning rate
that moves this model, wrecked it; RPO's likelihood term keeps the chosen answers up; on-policy rejected answers
taught the shape better than random ones; the replayed types keep the others; beta 0.5 kept colour where 0.1 lost
14 points; continued instruction tuning did as well or better.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from mmloom.inference.score import normalize_exact

STEPS, LR, BETA, RPO_ALPHA, REJECTED, REPLAY = 100, 1e-3, 0.5, 1.0, "own", 1.0  # the defaults (measured: see above)
TYPES = {  # question type -> pattern of the demo's questions (mmloom/demo/scenes.py)
    "colour": re.compile(r"^What colour is the \w+\?$"),
    "shape": re.compile(r"^What shape is the \w+ object\?$"),
    "count": re.compile(r"^How many shapes are there\?$"),
    "presence": re.compile(r"^Is there an? [\w ]+\?$"),
    "position": re.compile(r"left or right of"),
    "two images": re.compile(r"^Which picture has more shapes"),  # its pairs hold both scenes
}
SINGLE_SCENE = [t for t in TYPES if t != "two images"]


def mmloom(*args) -> None:
    command = [sys.executable, "-m", "mmloom", *map(str, args)]
    print("$ mmloom " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def question_type(text: str) -> str | None:
    return next((name for name, pattern in TYPES.items() if pattern.search(text)), None)


class Turn(NamedTuple):
    """One question of the demo's phase-2 training conversations, with its right answer."""

    type: str
    image: str | list[str]  # the two-image question: both scenes
    question: str
    answer: str


def training_turns(demo: Path) -> list[Turn]:
    """Every typed question of the demo's phase-2 training conversations."""
    records = [json.loads(line) for line in (demo / "data" / "phase2" / "train.jsonl").read_text().splitlines()]
    turns = [(r["image"], q["value"].replace("<image>", "").strip(), a["value"])
             for r in records for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True)]
    return [Turn(question_type(question), image, question, answer) for image, question, answer in turns
            if question_type(question) is not None]


def own_answers(demo: Path, model: Path, turns: list[Turn], out: Path) -> list[str]:
    """The model's own greedy answers to the training questions `turns` (`mmloom generate`, as the evaluation)."""
    questions, answers = out / "questions.jsonl", out / "answers.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    questions.write_text("".join(json.dumps({"question_id": str(i), "image": t.image, "text": t.question}) + "\n"
                                 for i, t in enumerate(turns)))
    mmloom("generate", model, questions, "--output", answers, "--image-dir", demo / "data", "--batch-size", 64,
           "--max-new-tokens", 6)
    by_id = {r["question_id"]: r["text"] for r in map(json.loads, answers.read_text().splitlines())}
    return [by_id[str(i)] for i in range(len(turns))]


def write_pairs(turns: list[Turn], out: Path, own: list[str] | None = None, seed: int = 0) -> dict:
    """The pairs as LLaVA's DPO json lines: the right answer chosen; rejected, the model's own answer (`own`)
    where it is wrong, else a random wrong answer of the same type. Returns how many of each."""
    answers: dict[str, set[str]] = {}
    for t in turns:
        answers.setdefault(t.type, set()).add(t.answer)
    rng = random.Random(seed)
    counts = {"pairs": len(turns), "own_rejected": 0, "random_rejected": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, t in enumerate(turns):
            mine = own[i].strip() if own is not None else ""
            if mine and normalize_exact(mine) != normalize_exact(t.answer):
                wrong, counts["own_rejected"] = mine, counts["own_rejected"] + 1
            else:
                wrong = rng.choice(sorted(answers[t.type] - {t.answer}))
                counts["random_rejected"] += 1
            f.write(json.dumps({"id": str(i), "image": t.image, "prompt": t.question, "chosen": t.answer,
                                "rejected": wrong}) + "\n")
    return counts


def write_conversations(turns: list[Turn], out: Path) -> None:
    """The control's data: each pair's prompt and chosen answer as a one-turn LLaVA conversation."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": str(i), "image": t.image, "conversations": [
        {"from": "human", "value": "<image>\n" * (len(t.image) if isinstance(t.image, list) else 1) + t.question},
        {"from": "gpt", "value": t.answer}]}) + "\n"
        for i, t in enumerate(turns)))


def evaluate(demo: Path, model: Path, out: Path, name: str, blank: bool = False) -> dict:
    answers, scores = out / f"answers_{name}.jsonl", out / f"scores_{name}.json"
    mmloom("generate", model, demo / "data" / "eval" / "questions.jsonl", "--output", answers, "--image-dir",
           demo / "data", "--batch-size", 64, "--max-new-tokens", 6, *(["--blank-images"] if blank else []))
    mmloom("score", answers, "--references", demo / "data" / "eval" / "references.jsonl", "--metric", "exact",
           "--by", "type", "--output-json", scores, "--overwrite")
    return json.loads(scores.read_text())


def by_type(scores: dict) -> dict[str, float]:
    """Accuracy per question type and overall, from `mmloom score --by type --output-json`."""
    out = {name: value["accuracy"] for name, value in scores["groups"].items()}
    out["overall"] = scores["overall"]["accuracy"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a `mmloom demo` output folder (its phase 2 done)")
    parser.add_argument("--out", type=Path, help="a new folder for phase 3 (default: DEMO/phase3)")
    parser.add_argument("--type", default="auto", choices=["auto", *TYPES], help="question type of the pairs")
    parser.add_argument("--rejected", default=REJECTED, choices=["own", "random"],
                        help="own: the phase-2 model's own wrong answer to each training question (a random wrong "
                        "one where it is right); random: a random wrong answer of the same type")
    parser.add_argument("--replay", type=float, default=REPLAY,
                        help="pairs of the other question types too, this many per pair of the type (drawn at random "
                        "from the training questions; they keep the other types from being forgotten)")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of phase 3")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--rpo-alpha", type=float, default=RPO_ALPHA,
                        help="weight of the chosen answers' NLL added to the DPO loss (0: plain DPO)")
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "robust", "hinge"])
    parser.add_argument("--sft", action="store_true", help="the control: the same steps of plain instruction "
                        "tuning on the chosen answers (no rejected answers, no reference)")
    args = parser.parse_args()
    demo = args.demo.resolve()
    phase2 = demo / "runs" / "phase2" / "final_model"
    out = (args.out or demo / "phase3").resolve()
    if out.exists():
        sys.exit(f"{out} exists: phase 3 writes a new folder (pass --out)")
    (out / "eval").mkdir(parents=True)
    started = time.monotonic()

    print("[1/4] the phase-2 model on the held-out questions, with the images")
    before = by_type(evaluate(demo, phase2, out / "eval", "phase2"))
    kind = args.type
    if kind == "auto":  # the weakest type the model can learn from a single object (position is relational;
        # "two images" compares two scenes: its pairs only replay)
        kind = min((t for t in before if t in SINGLE_SCENE and t != "position"), key=lambda t: before[t])
    every = training_turns(demo)
    turns = [t for t in every if t.type == kind]
    others = [t for t in every if t.type != kind]
    replay = random.Random(1).sample(others, min(len(others), round(args.replay * len(turns))))
    turns += replay
    data = yaml.safe_load((demo / "configs" / "data_phase2.yaml").read_text())
    data["setup"].update(output_dir=str(out / "h5"))
    if args.sft:
        write_conversations(turns, out / "conversations" / "train.jsonl")
        counts = {"conversations": len(turns)}
        print(f"[2/4] the control: {len(turns) - len(replay)} '{kind}' questions (and {len(replay)} of the other "
              "types) with their right answers, as conversations")
        data["setup"].update(input_dir=str(out / "conversations"))
    else:
        own = own_answers(demo, phase2, turns, out / "own") if args.rejected == "own" else None
        counts = write_pairs(turns, out / "pairs" / "pairs.jsonl", own)
        print(f"[2/4] {len(turns) - len(replay)} preference pairs on '{kind}' questions (and {len(replay)} of the "
              "other types; "
              "right answer chosen; rejected: "
              f"{counts['own_rejected']} the model's own wrong answer, {counts['random_rejected']} a random wrong one)")
        data["setup"].update(input_dir=str(out / "pairs"))
        data["dataset"]["preference"] = {"format": "llava"}
    (out / "data_phase3.yaml").write_text(yaml.safe_dump(data))
    mmloom("data", "build", out / "data_phase3.yaml", "--quiet")

    print("[3/4] phase 3 from the phase-2 model (vision encoder frozen): "
          + ("instruction tuning (the control)" if args.sft else f"DPO, rpo_alpha {args.rpo_alpha}"))
    train = yaml.safe_load((demo / "configs" / "train_phase2.yaml").read_text())
    train["train_input"].update(data_dir=str(out / "h5"), batch_size=args.batch_size)
    train.pop("eval_input", None)
    train["model"]["init_from"] = str(phase2)
    train["optimizer"]["lr"] = args.lr
    train["schedule"] = {"warmup_ratio": 0.05, "decay": "cosine"}
    train["runconfig"].update(max_steps=args.steps, checkpoint_steps=args.steps, log_steps=10)
    train["runconfig"].pop("checkpoint_path", None)
    if not args.sft:
        train["preference"] = {"loss": args.loss, "beta": args.beta, "rpo_alpha": args.rpo_alpha}
    (out / "train_phase3.yaml").write_text(yaml.safe_dump(train))
    train_started = time.monotonic()
    mmloom("train", out / "train_phase3.yaml", "--model-dir", out / "run")
    train_seconds = time.monotonic() - train_started
    mmloom("plot", out / "run")

    print("[4/4] the phase-3 model on the same questions, with the images and with every image blanked")
    after = by_type(evaluate(demo, out / "run" / "final_model", out / "eval", "phase3"))
    blank = by_type(evaluate(demo, out / "run" / "final_model", out / "eval", "phase3_blank", blank=True))
    rows = [f"{'type':<10} {'phase 2':>8} {'phase 3':>8} {'phase 3, image blanked':>24}"]
    for t in before:
        rows.append(f"{t:<10} {before[t]:8.1%} {after.get(t, float('nan')):8.1%} {blank.get(t, float('nan')):24.1%}")
    seconds = time.monotonic() - started
    print("\n".join(rows))
    print(f"phase 3 trained in {train_seconds:.0f} s; the example took {seconds:.0f} s")
    (out / "results.json").write_text(json.dumps({
        "type": kind, "replay": len(replay), **counts, "phase2": before, "phase3": after, "phase3_blank": blank,
        "train_seconds": round(train_seconds, 1), "seconds": round(seconds, 1),
        "settings": vars(args) | {"demo": str(demo), "out": str(out)}}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
