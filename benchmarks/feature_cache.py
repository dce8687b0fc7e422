"""Benchmark phase-1 training from cached encoder features vs from images (frozen encoder).

    python benchmarks/feature_cache.py                       # presets tiny and clip384, 10 steps, 3 repeats
    python benchmarks/feature_cache.py --presets clip384 --llm-hidden 512 --llm-layers 4
    python benchmarks/feature_cache.py --device cuda --presets clipL --steps 20

Per preset: synthetic PNGs (a crop of skimage's astronaut) + LLaVA "plain" records ->
`mmloom data build` -> `mmloom data cache-features` -> the same phase-1 run (projector only trains)
from images and from the cache, alternated, `--repeats` times. Step times are the trainer's own
(metrics.jsonl `step_time_s`, data loading included), step 1 left out (warm-up). Prints steps/s and
samples/s of both, the ratio (median over repeats), the cache's one-off cost and the largest
per-step loss difference between the two runs.

Presets (the LLM is a random Llama; `--llm-hidden/--llm-layers` change it):
  tiny     configs/tiny/phase1.yaml: CLIP 32 px / patch 8 (16 tokens), hidden 32, 3 layers
  clip384  CLIP 224 px / patch 16 (196 tokens), hidden 384, 8 layers (~14 M parameters)
  clipL    CLIP-L/14 at 336 px (576 tokens), hidden 1024, 24 layers (~300 M; for a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "tiny": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 3, "num_attention_heads": 4},
    "clip384": {"image_size": 224, "patch_size": 16, "hidden_size": 384, "intermediate_size": 1536,
                "num_hidden_layers": 8, "num_attention_heads": 6},
    "clipL": {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16},
}
ANSWERS = ["A red circle on the left and a blue square.", "There are two green triangles and one yellow star.",
           "Three.", "The quick brown fox jumps over the lazy dog, left of the circle, above the star."]


def make_data(root: Path, n: int, vision: dict) -> Path:
    """n PNGs (a bit larger than the encoder's side: resize + crop run) and plain records -> HDF5."""
    from skimage import data as skdata

    from mmloom.cli.main import main
    from mmloom.testing import tiny_tokenizer

    side = vision["image_size"]
    tiny_tokenizer().save_pretrained(root / "tok")
    rng = np.random.default_rng(0)
    base = skdata.astronaut()
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        y, x = rng.integers(0, base.shape[0] - 256, size=2)
        crop = base[y : y + 256, x : x + 256].astype(np.int16) + rng.integers(-8, 8, size=(256, 256, 3))
        img = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((side * 8 // 7, side * 8 // 7))
        img.save(root / "images" / f"{i:05d}.png")
        records.append({"id": str(i), "image": f"{i:05d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": " ".join(rng.choice(ANSWERS, 2))}]})
    (root / "jsonl").mkdir(exist_ok=True)
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    patches = (side // vision["patch_size"]) ** 2
    build = {"setup": {"input_dir": str(root / "jsonl"), "output_dir": str(root / "h5"), "processes": 1,
                       "samples_per_file": 256},
             "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": patches + 64},
             "dataset": {"num_patches": patches, "image_dir": str(root / "images"), "system_prompt_style": "plain"}}
    (root / "build.yaml").write_text(yaml.safe_dump(build))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet", "--overwrite"]) == 0
    return root


def train_config(root: Path, vision: dict, args) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "phase1.yaml").read_text())
    start = json.loads((root / "h5" / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
    for section in ("train_input", "eval_input"):
        cfg[section].update(data_dir=str(root / "h5"), img_data_dir=str(root / "images"),
                            image_size=vision["image_size"], batch_size=args.batch_size,
                            micro_batch_size=args.micro_batch_size, num_workers=args.num_workers)
    cfg["model"]["image_model"] = {"model_type": "clip_vision_model", "projection_dim": 32, **vision}
    if args.llm_hidden:
        cfg["model"]["text_model"].update(hidden_size=args.llm_hidden, intermediate_size=4 * args.llm_hidden,
                                          num_attention_heads=max(4, args.llm_hidden // 64),
                                          num_key_value_heads=max(4, args.llm_hidden // 64))
    if args.llm_layers:
        cfg["model"]["text_model"]["num_hidden_layers"] = args.llm_layers
    cfg["model"]["image_start_idx"] = start
    cfg["model"]["precision"] = args.precision
    cfg["runconfig"].update(max_steps=args.steps, log_steps=1, checkpoint_steps=10**6, save_final_model=False,
                            keep_last=1)
    return cfg


def run(config: Path, model_dir: Path, cached: bool) -> tuple[list[float], dict[int, float], float]:
    from mmloom.cli.main import main

    args = ["train", str(config), "--model-dir", str(model_dir)]
    if cached:
        args += ["--set", "train_input.use_cached_features=true"]
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the trainer's per-step log
        assert main(args) == 0
    records = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time_s" in r]
    times = [r["step_time_s"] for r in records if r["step"] > 1]
    wait = statistics.mean(r["data_wait_share"] for r in records if r["step"] > 1)
    return times, {r["step"]: r["loss"] for r in records}, wait


def bench(preset: str, args, workdir: Path) -> dict:
    from mmloom.training.config import load_train_config
    from mmloom.training.data import cache_features

    vision = PRESETS[preset]
    root = workdir / preset
    n = max(args.n, args.batch_size)
    make_data(root, n, vision)
    cfg = train_config(root, vision, args)
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    summary = cache_features(load_train_config(config), batch_size=args.cache_batch_size, device=args.device,
                             progress=False)
    cache_s = time.perf_counter() - t
    results = {"images": [], "cached": []}
    max_diff = 0.0
    for r in range(args.repeats):
        for kind in ("images", "cached"):
            times, loss, wait = run(config, root / f"run_{kind}_{r}", kind == "cached")
            results[kind].append((statistics.mean(times), wait, loss))
        a, b = results["images"][-1][2], results["cached"][-1][2]
        max_diff = max(max_diff, max(abs(a[s] - b[s]) for s in a))
    step = {k: statistics.median(v[0] for v in rows) for k, rows in results.items()}
    wait = {k: statistics.median(v[1] for v in rows) for k, rows in results.items()}
    per_repeat = [i[0] / c[0] for i, c in zip(results["images"], results["cached"], strict=True)]
    out = {
        "preset": preset,
        "steps/s images": 1 / step["images"], "steps/s cached": 1 / step["cached"],
        "samples/s images": args.batch_size / step["images"], "samples/s cached": args.batch_size / step["cached"],
        "speed-up": step["images"] / step["cached"], "speed-up per repeat": per_repeat,
        "data wait images": wait["images"], "data wait cached": wait["cached"],
        "cache seconds": cache_s, "cache images/s": summary["images_per_s"], "cache MiB": summary["bytes"] / 2**20,
        "max loss diff": max_diff,
    }
    print(
        f"[{preset}] images: {out['steps/s images']:.2f} steps/s ({out['samples/s images']:.1f} samples/s, "
        f"data wait {wait['images']:.0%}) | cached: {out['steps/s cached']:.2f} steps/s "
        f"({out['samples/s cached']:.1f} samples/s, data wait {wait['cached']:.0%}) | speed-up "
        f"{out['speed-up']:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in per_repeat)}) | cache: {cache_s:.1f} s "
        f"for {n} images, {out['cache MiB']:.1f} MiB | max |loss diff| {max_diff:.2e}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "clip384"], choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="image/cached run pairs (default 3)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--n", type=int, default=96, help="samples in the dataset (default 96)")
    ap.add_argument("--num-workers", type=int, default=0, help="train_input.num_workers (default 0)")
    ap.add_argument("--llm-hidden", type=int, default=None, help="LLM hidden size (default: the tiny config's 48)")
    ap.add_argument("--llm-layers", type=int, default=None, help="LLM layers (default: the tiny config's 2)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None, help="cache-features device (training uses the trainer's device)")
    ap.add_argument("--cache-batch-size", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}, "
          f"cuda {torch.cuda.is_available()}; {args.steps} steps x {args.repeats} repeats, batch {args.batch_size}",
          flush=True)
    rows = [bench(p, args, workdir) for p in args.presets]
    print("\npreset   | images steps/s | cached steps/s | speed-up")
    for r in rows:
        print(f"{r['preset']:<8} | {r['steps/s images']:>14.2f} | {r['steps/s cached']:>14.2f} | {r['speed-up']:.2f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
