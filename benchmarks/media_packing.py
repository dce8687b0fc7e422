"""Training throughput on a LLaVA-OneVision-like mix (single images, 2-6 images, video clips, text): packed vs padded.

    python benchmarks/media_packing.py                   # 8 timed steps x 3 repetitions per variant (~5 min)
    python benchmarks/media_packing.py --smoke           # tiny shapes, seconds (tests/test_benchmarks_smoke.py)
    python benchmarks/media_packing.py --steps 6 --reps 5 --json out.json

What runs. The tiny phase-2 model of `configs/tiny/phase2.yaml` (CLIP 3 x hidden 32, patch 8; Llama
2 x hidden 48, vocabulary 400; mlp2x_gelu; the vision tower frozen) at `--image-size` px (default 64:
8 x 8 = 64 features per image instead of the config's 16, so that images and frames are a larger
share of a sample, as in OneVision) with a video route (`model.video`: every frame through the
vision tower and projector, pooled bilinearly with stride 2 to 4 x 4 = 16 features, one learned
newline after the clip's last frame). The model is built by the trainer (`build_base_model`), the
data by `mmloom data build`, and the samples reach the model through the trainer's own dataset,
step samplers and collators (`TrainData`, `step_sampler`): what `mmloom train` runs, minus its loop.

Data (synthetic text, real pictures; `--records` records, shares roughly LLaVA-OneVision's OV stage
-- about half single-image, a third multi-image, a fifth video -- plus text-only):
- 40% single image: VQA (1-3 one-word answers), conversations (2-5 medium turns) or a detailed
  description (one long answer);
- 30% 2-6 images (uniform), placeholders spread over 1-3 human turns (M4-Instruct style);
- 20% one video clip of 8-32 frames (uniform; H.264 written with PyAV, a pan and zoom over a photo),
  all of its frames sampled (`num_frames: 32`): 8 x 16 + 1 = 129 to 32 x 16 + 1 = 513 tokens; a
  detailed caption or 1-3 QA turns;
- 10% text only (long multi-turn, ShareGPT-like; `text_only_slots: false`: no image slots).
Pictures are crops of the photos scikit-image ships; vicuna_v1 template, the offline tiny tokenizer,
MSL 1024.

Variants (one optimizer step = `--batch` samples, micro-batches of `--micro-batch`; float32, SDPA,
one process, one torch thread):
- full mix, every sample: `mmloom-padded` (no batching switch: random micro-batches, rows trimmed
  to the longest sample; the reference, 1.00x), `mmloom-group` (`train_input.group_by_length`),
  `mmloom-pack` (`train_input.packing`: one padding-free row per micro-batch, attention per sample);
- image mix (the same records without the video ones: single images, 2-6 images, text only; what
  transformers' LLaVA can run -- it has no video input): the three mmloom variants on a composite
  without the video route (same seed), and transformers' `LlavaForConditionalGeneration` holding a
  copy of its weights (`train_step.llava_like`): `hf-padded` (the same random micro-batches as
  `mmloom-padded`, right-padded to the longest, full-vocabulary logits loss: the HF Trainer default;
  the reference, 1.00x) and `hf-modality` (LLaVA's modality-length grouped sampler, which
  LLaVA-NeXT/OneVision train with: `train_step.modality_length_groups`).
Every variant of a mix computes the same gradient on the same samples per step (the same global
batch, a loss = sum of token losses / the step's supervised tokens, clipping at 1.0, AdamW), and
the first step's losses (before any update) are printed: they agree.

Timing. `time.thread_time()` of the one compute thread (immune to other processes on a shared
machine) over forward + backward of every micro-batch and the optimizer step. Reading the items
(decoding images and clips, transforms) and collating are timed apart (in training they run in
DataLoader workers). Step 0 of every variant is a warm-up (not timed); then `--reps` repetitions,
each running steps 1..`--steps` of every variant in turn, the variant order rotated every
repetition. Effective tokens are real tokens: text and media features, never padding, dummy images
or dummy clips (the same for every variant). Throughput of a repetition = its effective tokens /
its thread CPU seconds; ratios are taken within a repetition, reported as median [min, max].
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # media_build (photos, clips) and train_step (transformers' LLaVA)

WORDS = ("the a red blue green yellow circle square star triangle left right above below shape colour "
         "picture image question answer there is are two three one small large near far bright dark "
         "quick brown fox jumps over lazy dog chat assistant helpful detailed polite camera moves zooms").split()
SHORT_Q = ["What colour is the shape?", "How many people are there?", "Is it indoors?", "Where is the cup?"]
SINGLE = " Answer the question using a single word or phrase."
KINDS = ("single", "multi", "video", "text")
SHARES = (0.4, 0.3, 0.2, 0.1)
FULL = dict(records=960, image_size=64, n_images=48, n_clips=32, clip_frames=(8, 32), num_frames=32, msl=1024,
            batch=32, micro_batch=8, steps=8, reps=3)
SMOKE = dict(records=48, image_size=32, n_images=8, n_clips=4, clip_frames=(3, 6), num_frames=6, msl=768,
             batch=12, micro_batch=4, steps=1, reps=1)
MIX_VARIANTS = ("mmloom-padded", "mmloom-group", "mmloom-pack")
IMAGE_VARIANTS = ("hf-padded", "hf-modality", *MIX_VARIANTS)
SETS = {"mmloom-padded": [], "mmloom-group": ["train_input.group_by_length=true"],
        "mmloom-pack": ["train_input.packing=true"]}


# ------------------------------------------------------------------------------------- data
def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1)))).capitalize() + "."


def qa_turns(rng, kind: str) -> list[dict]:
    """The conversation of one record (placeholders added by `record`)."""
    turns = []

    def add(q, a):
        turns.extend([{"from": "human", "value": q}, {"from": "gpt", "value": a}])

    style = rng.choice(["vqa", "conv", "detail"], p=[0.5, 0.3, 0.2]) if kind != "text" else "text"
    if style == "vqa":
        for _ in range(int(rng.integers(1, 4))):
            add(str(rng.choice(SHORT_Q)) + SINGLE, str(rng.choice(["Yes.", "No.", "Red.", "Two.", "Left."])))
    elif style == "conv":
        for _ in range(int(rng.integers(2, 6))):
            add(sentence(rng, 4, 10)[:-1] + "?", " ".join(sentence(rng, 6, 14) for _ in range(int(rng.integers(1, 3)))))
    elif style == "detail":
        add("Describe it in detail.", " ".join(sentence(rng, 8, 16) for _ in range(int(rng.integers(3, 7)))))
    else:  # ShareGPT-like text-only: long multi-turn
        for _ in range(int(rng.integers(2, 5))):
            add(sentence(rng, 6, 14), " ".join(sentence(rng, 8, 16) for _ in range(int(rng.integers(2, 4)))))
    return turns


def record(i: int, kind: str, rng, n_images: int, n_clips: int) -> dict:
    turns = qa_turns(rng, kind)
    rec = {"id": f"{kind}{i}", "conversations": turns}
    humans = turns[::2]
    if kind == "single":
        rec["image"] = f"{int(rng.integers(n_images)):03d}.jpg"
        humans[0]["value"] = "<image>\n" + humans[0]["value"]
    elif kind == "multi":
        k = int(rng.integers(2, 7))
        rec["image"] = [f"{int(j):03d}.jpg" for j in rng.choice(n_images, k, replace=False)]
        # the placeholders over the human turns, in order, the first turn holding at least one
        cuts = sorted(rng.integers(0, len(humans), k - 1).tolist())
        per_turn = [1 + cuts.count(0)] + [cuts.count(t) for t in range(1, len(humans))]
        for turn, n in zip(humans, per_turn, strict=True):
            if n:
                turn["value"] = "".join(f"Image {j}: <image>\n" for j in range(n)) + turn["value"]
    elif kind == "video":
        rec["video"] = f"{int(rng.integers(n_clips)):03d}.mp4"
        humans[0]["value"] = "<video>\n" + humans[0]["value"]
    return rec


def make_data(root: Path, shape: dict, seed: int = 0) -> dict:
    """Pictures, clips, records and the two builds (`mix_h5`: every record; `images_h5`: without video)."""
    from media_build import crop, photos, write_clip
    from PIL import Image

    from mmloom.data.build import build
    from mmloom.data.build_config import parse_build_config
    from mmloom.testing import tiny_tokenizer

    rng = np.random.default_rng(seed)
    pics = photos()
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for i in range(shape["n_images"]):
        Image.fromarray(crop(pics[i % len(pics)], rng, shape["image_size"])).save(root / "images" / f"{i:03d}.jpg",
                                                                                   quality=90)
    lo, hi = shape["clip_frames"]
    clip_frames = [int(rng.integers(lo, hi + 1)) for _ in range(shape["n_clips"])]
    for i, n in enumerate(clip_frames):
        write_clip(root / "videos" / f"{i:03d}.mp4", pics[i % len(pics)], n, shape["image_size"], rng)
    kinds = rng.choice(len(KINDS), shape["records"], p=SHARES)
    records = [record(i, KINDS[k], rng, shape["n_images"], shape["n_clips"]) for i, k in enumerate(kinds)]
    tiny_tokenizer().save_pretrained(root / "tok")
    grid = shape["image_size"] // 8
    for name, keep in (("mix", records), ("images", [r for r in records if "video" not in r])):
        (root / f"{name}_jsonl").mkdir(exist_ok=True)
        (root / f"{name}_jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        dataset = {"num_patches": grid * grid, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1",
                   "text_only_slots": False}
        if name == "mix":
            dataset["video"] = {"video_dir": str(root / "videos"), "num_frames": shape["num_frames"],
                                "pool": {"mode": "bilinear", "stride": 2}, "newline": "one_token"}
        cfg = parse_build_config({
            "setup": {"input_dir": str(root / f"{name}_jsonl"), "output_dir": str(root / f"{name}_h5"), "processes": 1,
                      "samples_per_file": 256},
            "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": shape["msl"]},
            "dataset": dataset})
        params = build(cfg, quiet=True, overwrite=True, progress=False)
        skipped = {k: v for k, v in (params["post-process"].get("skipped") or {}).items() if v}
        if skipped or params["post-process"]["n_examples"] != len(keep):
            raise RuntimeError(f"the {name} build skipped records: {skipped}")
    return {"kinds": {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)}, "clip_frames": clip_frames}


# ------------------------------------------------------------------------------------ model
def train_config(root: Path, data: str, shape: dict, variant: str):
    """`configs/tiny/phase2.yaml` on `root/data`, with the variant's batching switch (and the video
    route for the mix): the `--set` overrides a user would give `mmloom train`."""
    from mmloom.training.config import load_train_config

    params = json.loads((root / f"{data}_h5" / "data_params.json").read_text())
    size = shape["image_size"]
    sets = [f"train_input.data_dir={root / f'{data}_h5'}", f"train_input.img_data_dir={root / 'images'}",
            f"train_input.image_size={size}", "eval_input=null", f"model.image_model.image_size={size}",
            f"model.image_start_idx={params['image_patch_info']['image_patch_start_idx']}",
            f"model.image_token_id={params['post-process']['image_token_id']}",
            f"model.text_model.max_position_embeddings={shape['msl']}",
            f"train_input.batch_size={shape['batch']}", f"train_input.micro_batch_size={shape['micro_batch']}",
            "runconfig.checkpoint_path=null", "runconfig.num_threads=1", *SETS.get(variant, [])]
    if "video" in params.get("modalities", {}):
        sets += [f"train_input.video_data_dir={root / 'videos'}", "model.video.pool.mode=bilinear",
                 "model.video.pool.stride=2", "model.video.newline=one_token",
                 f"model.video.token_id={params['modalities']['video']['token_id']}"]
    return load_train_config(ROOT / "configs" / "tiny" / "phase2.yaml", sets)


class Runner:
    """One variant: its own copy of the weights and AdamW, its micro-batches per step."""

    def __init__(self, name: str, model, lr: float):
        self.name, self.model, self.hf = name, model, name.startswith("hf")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.steps: dict[int, list[dict]] = {}

    def loss(self, b: dict, denominator: torch.Tensor) -> torch.Tensor:
        """Sum of this micro-batch's token losses / the step's supervised tokens."""
        if self.hf:
            pixels = b["vision"]["pixel_values"] if "vision" in b else None
            return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                              pixel_values=pixels, num_items_in_batch=denominator, use_cache=False).loss
        from mmloom.model.batch import model_inputs

        return self.model(**model_inputs(b), labels=b["labels"], num_items_in_batch=denominator,
                          compute_logits=False).loss

    def step(self, step: int) -> dict:
        batches = self.steps[step]
        denominator = torch.tensor(float(sum(b["num_loss_tokens"] for b in batches)))
        t0, total = time.thread_time(), 0.0
        for b in batches:
            loss = self.loss(b, denominator)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"s": time.thread_time() - t0, "loss": total}


def real_tokens(b: dict) -> int:
    return int(b["num_attended_tokens"]) if "num_attended_tokens" in b else int(b["attention_mask"].sum())


def computed_positions(b: dict) -> int:
    return int(b["input_ids"].numel())


# -------------------------------------------------------------------------------------- run
def prepare(root: Path, data: str, shape: dict, variants: tuple[str, ...]) -> tuple[dict, dict]:
    """The runners of one mix and what their steps hold: every variant's micro-batches for steps
    0..steps (items read once, each variant collating them), checked to carry the same samples,
    real and supervised tokens per step."""
    from train_step import llava_like, modality_length_groups

    from mmloom.data.collate import LlavaCollator
    from mmloom.training.data import TrainData, step_sampler
    from mmloom.training.distributed import DistContext
    from mmloom.training.model_loading import build_base_model

    cfgs = {v: train_config(root, data, shape, v) for v in variants}
    base = build_base_model(cfgs["mmloom-padded"])
    lr = cfgs["mmloom-padded"].optimizer.lr
    runners, datas, plan = {}, {}, None
    for v in variants:
        if v.startswith("hf"):
            continue
        model = copy.deepcopy(base)
        datas[v], plan = TrainData.for_run(cfgs[v], model, DistContext())  # packing: the attention switched here
        runners[v] = Runner(v, model, lr)
    dataset = datas["mmloom-padded"].dataset
    samplers = {v: step_sampler(cfgs[v].train_input, d.dataset, d.lengths, plan) for v, d in datas.items()}
    steps = range(shape["steps"] + 1)
    plain = {s: samplers["mmloom-padded"].step_micro_batches(s) for s in steps}
    needed = sorted({i for s in steps for mb in plain[s] for i in mb})
    t0 = time.thread_time()
    items = {i: dataset[i] for i in needed}
    read_s = (time.thread_time() - t0) / len(steps)
    collate_s = {}
    for v, runner in runners.items():
        t0 = time.thread_time()
        for s in steps:
            mbs = samplers[v].step_micro_batches(s)
            assert sorted(i for mb in mbs for i in mb) == sorted(i for mb in plain[s] for i in mb), (v, s)
            runner.steps[s] = [datas[v].collate([items[i] for i in mb]) for mb in mbs]
        collate_s[v] = (time.thread_time() - t0) / len(steps)
    if any(v.startswith("hf") for v in variants):
        hf = llava_like(base, base.placeholder_token_ids["vision"])
        hf_collate = LlavaCollator(base.placeholder_token_ids["vision"], pad_id(root, data),
                                   base.num_feature_tokens("vision"), trim=True)
        lengths = {i: int((items[i]["key_padding_mask"] == 0).sum()) for i in items}
        for v in variants:
            if not v.startswith("hf"):
                continue
            runner = runners[v] = Runner(v, copy.deepcopy(hf), lr)
            t0 = time.thread_time()
            for s in steps:
                if v == "hf-padded":
                    mbs = plain[s]
                else:  # LLaVA's modality-length grouping of the step's samples
                    idx = [i for mb in plain[s] for i in mb]
                    groups = modality_length_groups([lengths[i] for i in idx], [bool(items[i]["has_image"]) for i in idx],
                                                    shape["micro_batch"], len(idx), s)
                    mbs = [[idx[j] for j in g] for g in groups]
                runner.steps[s] = [hf_batch(hf_collate([items[i] for i in mb])) for mb in mbs]
            collate_s[v] = (time.thread_time() - t0) / len(steps)
    # the same work for every variant: real (effective) and supervised tokens per step
    tokens = {}
    for v, runner in runners.items():
        tokens[v] = [(sum(real_tokens(b) for b in runner.steps[s]), sum(b["num_loss_tokens"] for b in runner.steps[s]))
                     for s in steps]
    assert len({tuple(t) for t in tokens.values()}) == 1, f"variants differ in real / supervised tokens: {tokens}"
    info = {"read_s_per_step": read_s, "collate_s_per_step": collate_s,
            "real_tokens": [t[0] for t in tokens["mmloom-padded"]],
            "supervised_tokens": [t[1] for t in tokens["mmloom-padded"]],
            "computed_positions": {v: [sum(computed_positions(b) for b in r.steps[s]) for s in steps]
                                   for v, r in runners.items()},
            "micro_batches": {v: [len(r.steps[s]) for s in steps] for v, r in runners.items()},
            "samples": len(dataset), "items": step_items(items, plain, steps)}
    return {v: runners[v] for v in variants}, info


def pad_id(root: Path, data: str) -> int:
    """The pad id the trainer uses here (phase2.yaml sets no model.pad_token_id: the data's)."""
    return int(json.loads((root / f"{data}_h5" / "data_params.json").read_text())["post-process"]["pad_id"])


def hf_batch(b: dict) -> dict:
    """A `LlavaCollator` batch as transformers' LLaVA takes it: image samples with their image tokens,
    text-only samples without slots, no dummy image (nothing to keep in the graph on one process)."""
    b["num_attended_tokens"] = int(b["attention_mask"].sum())
    return b


def step_items(items: dict, plain: dict, steps) -> dict:
    """What the timed steps hold: samples by kind, images, clips and frames."""
    out = {"single": 0, "multi": 0, "video": 0, "text": 0, "images": 0, "clips": 0, "frames": 0}
    for s in list(steps)[1:]:
        for mb in plain[s]:
            for i in mb:
                item = items[i]
                clips = item.get("video") or []
                n_img = len(item["vision"]) if item.get("vision") else int(bool(item["has_image"]))
                kind = "video" if clips else "multi" if n_img > 1 else "single" if n_img else "text"
                out[kind] += 1
                out["images"] += n_img
                out["clips"] += len(clips)
                out["frames"] += sum(int(c["video_frames"]) for c in clips)
    return out


def run_mix(name: str, runners: dict, info: dict, shape: dict) -> dict:
    names = list(runners)
    first = {v: r.step(0)["loss"] for v, r in runners.items()}  # warm-up: step 0, before any update
    reps = {v: [] for v in names}
    tokens = sum(info["real_tokens"][1:])
    for rep in range(shape["reps"]):
        k = rep % len(names)
        for v in names[k:] + names[:k]:
            secs = [runners[v].step(s)["s"] for s in range(1, shape["steps"] + 1)]
            reps[v].append(sum(secs))
        print(f"  {name}, repetition {rep + 1}/{shape['reps']}: "
              + ", ".join(f"{v} {reps[v][-1] / shape['steps']:.2f} s/step" for v in names), flush=True)
    base = names[0]
    out = {"variants": {}, "reference": base, "real_tokens_per_step": tokens / shape["steps"],
           "supervised_tokens_per_step": sum(info["supervised_tokens"][1:]) / shape["steps"], "info": info}
    for v in names:
        ratios = [b / a for a, b in zip(reps[v], reps[base], strict=True)]
        per_step = [x / shape["steps"] for x in reps[v]]
        computed = sum(info["computed_positions"][v][1:])
        out["variants"][v] = {
            "step_s": {"median": statistics.median(per_step), "min": min(per_step), "max": max(per_step),
                       "all": per_step},
            "tokens_per_s": tokens / statistics.median(reps[v]),
            "us_per_token": statistics.median(reps[v]) / tokens * 1e6,
            "vs_reference": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "real_over_computed": tokens / computed,
            "micro_batches_per_step": statistics.mean(info["micro_batches"][v][1:]),
            "collate_s_per_step": info["collate_s_per_step"][v], "first_loss": first[v],
        }
    return out


def print_table(title: str, res: dict) -> None:
    ref = res["reference"]
    print(f"\n{title}: {res['real_tokens_per_step']:,.0f} effective tokens per step "
          f"({res['supervised_tokens_per_step']:,.0f} supervised)")
    print(f"| variant | real / computed positions | micro-batches per step | step s, thread CPU [min, max] | "
          f"us CPU per effective token | effective tokens/s | vs {ref} [min, max] | collate s/step | first-step loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, r in res["variants"].items():
        s, q = r["step_s"], r["vs_reference"]
        print(f"| {v} | {r['real_over_computed']:.0%} | {r['micro_batches_per_step']:.1f} | {s['median']:.3f} "
              f"[{s['min']:.3f}, {s['max']:.3f}] | {r['us_per_token']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{q['median']:.2f}x [{q['min']:.2f}, {q['max']:.2f}] | {r['collate_s_per_step']:.3f} | "
              f"{r['first_loss']:.6f} |")
    losses = [r["first_loss"] for r in res["variants"].values()]
    print(f"first-step losses (same weights, same samples): spread {max(losses) - min(losses):.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition (seconds)")
    ap.add_argument("--records", type=int, default=None, help=f"records (default {FULL['records']})")
    ap.add_argument("--image-size", type=int, default=None, help=f"image side, px (default {FULL['image_size']})")
    ap.add_argument("--batch", type=int, default=None, help=f"samples per step (default {FULL['batch']})")
    ap.add_argument("--micro-batch", type=int, default=None, help=f"samples per micro-batch (default {FULL['micro_batch']})")
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps per repetition (default {FULL['steps']})")
    ap.add_argument("--reps", type=int, default=None, help=f"repetitions (default {FULL['reps']})")
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    shape = dict(SMOKE if args.smoke else FULL)
    for key in ("records", "image_size", "batch", "micro_batch", "steps", "reps"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    problem = next((msg for bad, msg in (
        (min(shape["steps"], shape["reps"], shape["micro_batch"]) < 1, "--steps, --reps and --micro-batch must be at "
         "least 1"),
        (shape["batch"] % shape["micro_batch"], f"--batch {shape['batch']} is not a whole number of micro-batches of "
         f"{shape['micro_batch']}"),
        (shape["image_size"] % 8, f"--image-size {shape['image_size']}: give a multiple of 8 (the patch size)"),
        (shape["records"] * 0.7 < shape["batch"] * (shape["steps"] + 1),
         f"--records {shape['records']}: the image mix (about 80% of the records) needs {shape['batch'] * (shape['steps'] + 1)} "
         f"samples for {shape['steps'] + 1} steps of {shape['batch']}, none seen twice: give at least "
         f"{-(-shape['batch'] * (shape['steps'] + 1) * 10 // 7)}"),
    ) if bad), None)
    if problem:
        print(f"media_packing.py: error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    load0, t_start = os.getloadavg(), time.time()
    stamp = root / "inputs.json"
    key = json.dumps({k: shape[k] for k in ("records", "image_size", "n_images", "n_clips", "clip_frames",
                                             "num_frames", "msl")})
    if stamp.is_file() and json.loads(stamp.read_text())["key"] == key:  # a kept --workdir is reused
        made = json.loads(stamp.read_text())["made"]
    else:
        made = make_data(root, shape)
        stamp.write_text(json.dumps({"key": key, "made": made}))
    print(f"data: {shape['records']} records {made['kinds']}; {shape['n_images']} JPEGs and {shape['n_clips']} clips "
          f"({min(made['clip_frames'])}-{max(made['clip_frames'])} frames) of {shape['image_size']} px; MSL "
          f"{shape['msl']}; built in {time.time() - t_start:.0f} s", flush=True)
    print(f"run: batch {shape['batch']}, micro-batch {shape['micro_batch']}, step 0 warm-up + {shape['steps']} timed "
          f"steps x {shape['reps']} repetitions; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} thread", flush=True)

    results = {}
    for name, data, variants, title in (
        ("mix", "mix", MIX_VARIANTS, "Full mix (single images, 2-6 images, video clips, text only)"),
        ("images", "images", IMAGE_VARIANTS, "Image mix (single images, 2-6 images, text only: what transformers' "
                                             "LLaVA can run)"),
    ):
        runners, info = prepare(root, data, shape, variants)
        items = info["items"]
        print(f"\n{name}: timed steps hold {items['single']} single-image, {items['multi']} multi-image, "
              f"{items['video']} video, {items['text']} text-only samples; {items['images']} images, "
              f"{items['clips']} clips of {items['frames']} frames; reading them: {info['read_s_per_step']:.2f} s "
              "thread CPU per step", flush=True)
        results[name] = run_mix(name, runners, info, shape)
        print_table(title, results[name])
        del runners
    load1 = os.getloadavg()
    print(f"\nwall {time.time() - t_start:.0f} s, load average {load0[0]:.1f} -> {load1[0]:.1f}")
    if args.json:
        out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "torch": torch.__version__, "transformers": transformers.__version__, "shape": shape,
               "data": made, "results": results, "load": [load0, load1]}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
