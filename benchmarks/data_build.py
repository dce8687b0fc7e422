"""Benchmark `mmloom data build`: N synthetic LLaVA records with real PNG files, 1 vs P processes.

    python benchmarks/data_build.py                 # 2000 records, 224x224 PNGs, processes 1 and 2
    python benchmarks/data_build.py --n 5000 --processes 1 2 4 --image-size 336 --template plain

Uses the offline tiny tokenizer (no hub access), MSL 2048 and 576 image slots (the LLaVA-1.5
layout). Prints samples/s per process count, the speed-up over 1 process, and checks that every
run wrote byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = [
    "What is in the image?",
    "Describe the picture in detail.",
    "How many shapes are there?",
    "What colour is the shape on the left?",
    "Is there a circle? Answer the question using a single word or phrase.",
]
ANSWERS = [
    "A red circle on the left and a blue square.",
    "There are two green triangles and one yellow star.",
    "Three.",
    "Red.",
    "Yes.",
    "The quick brown fox jumps over the lazy dog, left of the circle, above the star.",
]


def make_inputs(root: Path, n: int, image_size: int, n_images: int, seed: int = 0) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    base = data.astronaut()
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        y, x = rng.integers(0, base.shape[0] - 256, size=2)
        crop = base[y : y + 256, x : x + 256].astype(np.int16) + rng.integers(-8, 8, size=(256, 256, 3))
        Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((image_size, image_size)).save(
            img_dir / f"{i:06d}.png"
        )
    lines = []
    for i in range(n):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            if t == 0:
                q = "<image>\n" + q
            turns += [
                {"from": "human", "value": q},
                {"from": "gpt", "value": " ".join(rng.choice(ANSWERS, 2))},
            ]
        lines.append(json.dumps({"id": str(i), "image": f"{i % n_images:06d}.png", "conversations": turns}))
    (root / "in").mkdir(exist_ok=True)
    half = n // 2
    (root / "in" / "part0.jsonl").write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
    (root / "in" / "part1.jsonl").write_text("\n".join(lines[half:]) + "\n", encoding="utf-8")


def digest(folder: Path) -> str:
    """Of the HDF5 files and data_params.json less its `setup` section (which names the output folder
    and the process count, the two things that differ between the builds compared)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        if p.name == "data_params.json":
            params = json.loads(p.read_text())
            params.pop("setup")
            h.update(json.dumps(params, sort_keys=True).encode())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="records (default 2000)")
    ap.add_argument("--image-size", type=int, default=224, help="PNG side in pixels (default 224)")
    ap.add_argument(
        "--n-images", type=int, default=None, help="distinct image files (default: one per record)"
    )
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--template", default="vicuna_v1")
    ap.add_argument("--msl", type=int, default=2048)
    ap.add_argument("--num-patches", type=int, default=576)
    ap.add_argument("--samples-per-file", type=int, default=500)
    ap.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temp folder)")
    args = ap.parse_args(argv)

    from mmloom.data.build import build
    from mmloom.data.build_config import parse_build_config
    from mmloom.testing import tiny_tokenizer

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp = root / "inputs.json"
    key = json.dumps([args.n, args.image_size, args.n_images or args.n])
    if not (stamp.is_file() and stamp.read_text() == key):  # a kept --workdir is reused
        make_inputs(root, args.n, args.image_size, args.n_images or args.n)
        tiny_tokenizer().save_pretrained(root / "tok")
        stamp.write_text(key)
    print(
        f"inputs: {args.n} records, {args.n_images or args.n} PNGs of {args.image_size}px "
        f"({time.perf_counter() - t0:.1f} s to generate); cpus: {os.cpu_count()}",
        flush=True,
    )

    results = {}
    for p in args.processes:
        out = root / f"out_p{p}"
        cfg = parse_build_config(
            {
                "setup": {
                    "input_dir": str(root / "in"),
                    "output_dir": str(out),
                    "processes": p,
                    "samples_per_file": args.samples_per_file,
                },
                "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": args.msl},
                "dataset": {
                    "num_patches": args.num_patches,
                    "image_dir": str(root / "images"),
                    "system_prompt_style": args.template,
                },
            }
        )
        load = os.getloadavg()[0]
        c0, t = os.times(), time.perf_counter()
        params = build(cfg, quiet=True, overwrite=True, progress=False)
        dt, c1 = time.perf_counter() - t, os.times()
        main_cpu = c1.user - c0.user + c1.system - c0.system
        worker_cpu = c1.children_user - c0.children_user + c1.children_system - c0.children_system
        results[p] = (dt, params["post-process"]["n_examples"], digest(out))
        print(
            f"processes={p}: {dt:.2f} s, {args.n / dt:,.0f} samples/s, kept {results[p][1]}, "
            f"cpu main {main_cpu:.2f} s + workers {worker_cpu:.2f} s, load avg before {load:.2f}, "
            f"output digest {results[p][2]}",
            flush=True,
        )
    base = results[args.processes[0]][0]
    for p, (dt, _, _) in results.items():
        print(f"speed-up processes={p} vs {args.processes[0]}: {base / dt:.2f}x")
    identical = len({d for _, _, d in results.values()}) == 1
    print(f"byte-identical outputs: {identical}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
