"""Benchmark `mmloom data build` on records with several images and on records with video clips, 1 vs P processes.

    python benchmarks/media_build.py                  # 1200 multi-image + 240 video records, 1 and 2 processes, 3 reps
    python benchmarks/media_build.py --smoke          # tiny shapes, seconds (tests/test_benchmarks_smoke.py)
    python benchmarks/media_build.py --processes 1 2 4 --num-frames 8 16 32 --json out.json

Inputs (synthetic records, real pictures), written once into `--workdir` (reused when it is kept):

- multi-image records (M4-Instruct / LLaVA-OneVision style): 2-6 images each (uniform), every image
  its own JPEG file (quality 90, `--image-size` px square): a crop of one of eight photos that
  scikit-image ships (astronaut, cat, coffee, rocket, ...) at a random place and scale. The `<image>`
  placeholders are spread over 1-3 human turns, in order (interleaved, not all in the first turn);
- video records: one clip each, `--clip-frames` frames (uniform in [lo, hi]) of `--clip-size` px at
  30 fps, H.264 (libx264, yuv420p, .mp4) written with PyAV: the camera pans and zooms over one of the
  same photos, so that the codec sees real texture and motion. Each video build samples
  `num_frames` per clip (`dataset.video.num_frames`, one build per value of `--num-frames`), pools
  (bilinear, stride 2) and puts one newline after the last frame.

The builds: vicuna_v1, the offline tiny tokenizer, MSL 8192, 729 slots per image (LLaVA-OneVision's
SigLIP-384 grid, 27 x 27; a frame then counts ceil(27 / 2)^2 = 196 tokens); `setup.processes` 1 vs
2 (`--processes`). Each setting is built `--reps` times, the process counts alternating inside each
repetition (the order rotated every repetition); every output of a setting must be byte-identical
(the HDF5 files and data_params.json less its `setup` section). Each repetition of a process count is
one fresh Python process (as the CLI runs) that first builds four records untimed (imports, the
tokenizer, the codecs), then every setting in turn.

What is reported, per setting and process count (medians over repetitions):
- samples/s: kept records / wall time of `build()` (its whole work: reading, decoding, tokenizing,
  writing the HDF5 files);
- per process: samples/s divided by the processes, and samples per CPU second (the CPU time of the
  build's processes: the main process's own, and with P > 1 its workers' too): what one process does
  per second of a core it has to itself. On a machine other work shares, wall time moves with the
  load and CPU time much less: read the CPU figures for per-process throughput, the wall ones for
  what a user waits;
- images decoded/s (multi-image builds: each image is decoded in full once, the build's check that
  it is readable) and, for video, frames decoded/s and frames sampled/s: the build decodes a clip
  once, up to its last sampled frame, which with uniform sampling (first and last frame included)
  is every frame of the clip; the sampled frames are the ones kept (converted to RGB) and counted
  into the sample's tokens.
"""

from __future__ import annotations

import argparse
import hashlib
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

PHOTOS = ("astronaut", "cat", "coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina")
MSL = 8192
NUM_PATCHES = 729  # SigLIP-so400m/384: 27 x 27 patches (LLaVA-OneVision)
QUESTIONS = [
    "What is different between these pictures?",
    "Which of them was taken indoors?",
    "Describe what they have in common.",
    "Which picture is the brightest? Answer the question using a single word or phrase.",
    "What colour dominates here?",
]
VIDEO_QUESTIONS = [
    "Describe what happens in the video in detail.",
    "Which way does the camera move?",
    "What is shown at the end of the clip?",
    "Is the camera zooming in or out? Answer the question using a single word or phrase.",
]
ANSWERS = [
    "The first one is darker and shows more detail on the left.",
    "A person in a white suit stands in front of a flag.",
    "The camera moves slowly to the right and then zooms in on the centre.",
    "Two.",
    "Left.",
    "A cup of coffee on a saucer, seen from above, next to a spoon.",
    "The picture shows a rocket on its launch pad under a clear sky.",
]
FULL = dict(n_multi=1200, n_videos=240, image_size=224, clip_size=224, clip_frames=(64, 128), num_frames=(8, 32),
            reps=3)
SMOKE = dict(n_multi=12, n_videos=6, image_size=48, clip_size=48, clip_frames=(10, 16), num_frames=(4, 8), reps=1)


def photos() -> list[np.ndarray]:
    from skimage import data

    return [getattr(data, name)()[..., :3] for name in PHOTOS]


def crop(photo: np.ndarray, rng, side: int) -> np.ndarray:
    """A random square crop of `photo` (a third to all of its short side), resized to `side` px."""
    from PIL import Image

    h, w = photo.shape[:2]
    s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return np.asarray(Image.fromarray(photo[y : y + s, x : x + s]).resize((side, side), Image.BILINEAR))


def write_clip(path: Path, photo: np.ndarray, frames: int, side: int, rng) -> None:
    """`frames` frames at 30 fps: a window panning across `photo` while it zooms (H.264, .mp4)."""
    import av
    from PIL import Image

    h, w = photo.shape[:2]
    s0, s1 = (int(rng.integers(min(h, w) // 3, min(h, w) * 2 // 3 + 1)) for _ in range(2))
    y0, y1 = (int(rng.integers(0, h - max(s0, s1) + 1)) for _ in range(2))
    x0, x1 = (int(rng.integers(0, w - max(s0, s1) + 1)) for _ in range(2))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for t in range(frames):
            a = t / max(frames - 1, 1)
            s, y, x = (int(round(u + (v - u) * a)) for u, v in ((s0, s1), (y0, y1), (x0, x1)))
            frame = np.asarray(Image.fromarray(photo[y : y + s, x : x + s]).resize((side, side), Image.BILINEAR))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def turns_with(placeholders: list[str], rng, questions: list[str]) -> list[dict]:
    """1-3 human/gpt turns, the placeholders spread over the human turns in order (the first turn has one)."""
    n_turns = int(rng.integers(1, min(3, len(placeholders)) + 1))
    cuts = sorted(rng.choice(np.arange(1, len(placeholders)), n_turns - 1, replace=False).tolist()) if n_turns > 1 else []
    groups = np.split(np.array(placeholders), cuts)
    turns = []
    for group in groups:
        q = "\n".join(group.tolist()) + "\n" + str(rng.choice(questions))
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": " ".join(rng.choice(ANSWERS, 2).tolist())}]
    return turns


def make_inputs(root: Path, shape: dict, seed: int = 0) -> dict:
    """Write the images, clips and records; returns what they hold (counts used by the throughput figures)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pics = photos()
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    multi, n_images = [], 0
    for i in range(shape["n_multi"]):
        k = int(rng.integers(2, 7))
        names = []
        for j in range(k):
            name = f"{i:05d}_{j}.jpg"
            Image.fromarray(crop(pics[int(rng.integers(len(pics)))], rng, shape["image_size"])).save(
                root / "images" / name, quality=90)
            names.append(name)
        n_images += k
        placeholders = [f"Image {j + 1}: <image>" for j in range(k)]
        multi.append({"id": f"m{i}", "image": names, "conversations": turns_with(placeholders, rng, QUESTIONS)})
    lo, hi = shape["clip_frames"]
    videos, lengths = [], []
    for i in range(shape["n_videos"]):
        n = int(rng.integers(lo, hi + 1))
        write_clip(root / "videos" / f"{i:05d}.mp4", pics[int(rng.integers(len(pics)))], n, shape["clip_size"], rng)
        lengths.append(n)
        turns = turns_with(["<video>"], rng, VIDEO_QUESTIONS)
        videos.append({"id": f"v{i}", "video": f"{i:05d}.mp4", "conversations": turns})
    (root / "warmup").mkdir(exist_ok=True)  # an untimed build first in every process: imports, tokenizer, codecs
    (root / "warmup" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi[:2] + videos[:2]))
    for name, records in (("multi", multi), ("video", videos)):
        (root / name).mkdir(exist_ok=True)
        half = len(records) // 2
        for part, chunk in enumerate((records[:half], records[half:])):
            (root / name / f"part{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return {"multi_records": len(multi), "images": n_images, "video_records": len(videos), "clip_frames": lengths}


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


def build_config(root: Path, setting: str, processes: int, samples_per_file: int) -> dict:
    dataset = {"num_patches": NUM_PATCHES, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1",
               "text_only_slots": False}
    if setting != "multi":
        frames = 8 if setting == "warmup" else int(setting.split("-")[1])
        dataset["video"] = {"video_dir": str(root / "videos"), "num_frames": frames,
                            "pool": {"mode": "bilinear", "stride": 2}, "newline": "one_token"}
    return {
        "setup": {"input_dir": str(root / ("video" if setting.startswith("video") else setting)),
                  "output_dir": str(root / "out" / f"{setting}_p{processes}"), "processes": processes,
                  "samples_per_file": samples_per_file},
        "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": MSL},
        "dataset": dataset,
    }


def one_build(config: dict) -> dict:
    """Run one build in this process: wall seconds of `build()`, CPU seconds of this process and of its
    (finished) workers, kept samples, skips, the output's digest."""
    from mmloom.data.build import build
    from mmloom.data.build_config import parse_build_config

    cfg = parse_build_config(config)
    c0, t0 = os.times(), time.perf_counter()
    params = build(cfg, quiet=True, overwrite=True, progress=False)
    wall, c1 = time.perf_counter() - t0, os.times()
    post = params["post-process"]
    return {
        "wall_s": wall,
        "main_cpu_s": c1.user - c0.user + c1.system - c0.system,
        "worker_cpu_s": c1.children_user - c0.children_user + c1.children_system - c0.children_system,
        "kept": post["n_examples"], "skipped": {k: v for k, v in (post.get("skipped") or {}).items() if v},
        "digest": digest(Path(cfg.setup.output_dir)),
    }


def timed_builds(configs: list[dict], root: Path) -> list[dict]:
    """`one_build` of each config, in order, in one fresh Python process (as `mmloom data build` runs
    them), the configs of one process count only; the first (a warm-up) is left out of the results.
    Not in this process: each process count is measured in a clean process (see the README)."""
    import subprocess

    assert len({c["setup"]["processes"] for c in configs}) == 1
    path = root / "out" / "configs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(configs))
    proc = subprocess.run([sys.executable, __file__, "--one-build", str(path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"a build failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])[1:]  # the first is the warm-up


def frame_counts(lengths: list[int], num_frames: int) -> tuple[int, int]:
    """(frames decoded, frames sampled) over the clips: decoding runs to the last sampled frame,
    the clip's last with uniform sampling (`mmloom.processing.video.uniform_indices`)."""
    from mmloom.processing.video import uniform_indices

    decoded = sum(uniform_indices(n, num_frames)[-1] + 1 for n in lengths)
    sampled = sum(len(uniform_indices(n, num_frames)) for n in lengths)
    return decoded, sampled


def summarise(runs: list[dict], processes: int, units: dict[str, int]) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["main_cpu_s"] + r["worker_cpu_s"] for r in runs)
    kept = runs[0]["kept"]
    out = {"processes": processes, "wall_s": wall, "cpu_s": cpu, "kept": kept,
           "wall_all": [r["wall_s"] for r in runs], "cpu_all": [r["main_cpu_s"] + r["worker_cpu_s"] for r in runs],
           "samples_per_s": kept / wall, "samples_per_s_per_process": kept / wall / processes,
           "samples_per_cpu_s": kept / cpu}
    for unit, n in units.items():
        out[f"{unit}_per_s_per_process"] = n / wall / processes
        out[f"{unit}_per_cpu_s"] = n / cpu
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition (seconds)")
    ap.add_argument("--n-multi", type=int, default=None, help=f"multi-image records (default {FULL['n_multi']})")
    ap.add_argument("--n-videos", type=int, default=None, help=f"video records (default {FULL['n_videos']})")
    ap.add_argument("--image-size", type=int, default=None, help=f"JPEG side in px (default {FULL['image_size']})")
    ap.add_argument("--clip-size", type=int, default=None, help=f"clip side in px (default {FULL['clip_size']})")
    ap.add_argument("--clip-frames", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                    help=f"frames per clip, uniform in [LO, HI] (default {FULL['clip_frames']})")
    ap.add_argument("--num-frames", type=int, nargs="+", default=None,
                    help=f"dataset.video.num_frames, one video build each (default {FULL['num_frames']})")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=None, help=f"repetitions (default {FULL['reps']}; smoke 1)")
    ap.add_argument("--samples-per-file", type=int, default=100)
    ap.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--one-build", default=None, help=argparse.SUPPRESS)  # internal: one build, in this process
    args = ap.parse_args(argv)
    if args.one_build:
        print(json.dumps([one_build(c) for c in json.loads(Path(args.one_build).read_text())]))
        return 0
    shape = dict(SMOKE if args.smoke else FULL)
    for key in ("n_multi", "n_videos", "image_size", "clip_size", "clip_frames", "num_frames", "reps"):
        if getattr(args, key) is not None:
            shape[key] = tuple(getattr(args, key)) if isinstance(getattr(args, key), list) else getattr(args, key)
    lo, hi = shape["clip_frames"]
    problem = next((msg for bad, msg in (
        (shape["n_multi"] < 2 or shape["n_videos"] < 2, "--n-multi and --n-videos must be at least 2"),
        (not 1 <= lo <= hi, f"--clip-frames {lo} {hi}: give 1 <= LO <= HI"),
        (min(shape["num_frames"]) < 1 or min(args.processes) < 1 or shape["reps"] < 1,
         "--num-frames, --processes and --reps must be at least 1"),
    ) if bad), None)
    if problem:
        print(f"media_build.py: error: {problem}", file=sys.stderr)
        return 2

    from mmloom.testing import tiny_tokenizer

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "inputs.json"
    key = json.dumps({k: shape[k] for k in ("n_multi", "n_videos", "image_size", "clip_size", "clip_frames")})
    t0 = time.perf_counter()
    if stamp.is_file() and json.loads(stamp.read_text())["key"] == key:  # a kept --workdir is reused
        inputs = json.loads(stamp.read_text())["inputs"]
    else:
        inputs = make_inputs(root, shape)
        tiny_tokenizer().save_pretrained(root / "tok")
        stamp.write_text(json.dumps({"key": key, "inputs": inputs}))
    lengths = inputs["clip_frames"]
    print(f"inputs: {inputs['multi_records']} multi-image records ({inputs['images']} JPEGs of {shape['image_size']} "
          f"px, {inputs['images'] / inputs['multi_records']:.2f} per record); {inputs['video_records']} video records "
          f"(one H.264 clip each, {shape['clip_size']} px, {min(lengths)}-{max(lengths)} frames, mean "
          f"{np.mean(lengths):.0f}) ({time.perf_counter() - t0:.1f} s to write); cpus {os.cpu_count()}", flush=True)

    settings = ["multi", *(f"video-{k}" for k in shape["num_frames"])]
    units = {"multi": {"images": inputs["images"]}}
    for k in shape["num_frames"]:
        decoded, sampled = frame_counts(lengths, k)
        units[f"video-{k}"] = {"frames_decoded": decoded, "frames_sampled": sampled}
    load0 = os.getloadavg()
    runs = {s: {p: [] for p in args.processes} for s in settings}
    for rep in range(shape["reps"]):
        k = rep % len(args.processes)
        for p in args.processes[k:] + args.processes[:k]:  # one process per count, its settings in turn
            done = timed_builds([build_config(root, s, p, args.samples_per_file) for s in ["warmup", *settings]], root)
            for setting, r in zip(settings, done, strict=True):
                r["load"] = os.getloadavg()[0]
                runs[setting][p].append(r)
                print(f"rep {rep + 1} {setting:9s} processes={p}: {r['wall_s']:6.2f} s wall, cpu {r['main_cpu_s']:.2f} s "
                      f"main + {r['worker_cpu_s']:.2f} s workers, kept {r['kept']}, digest {r['digest']}", flush=True)
            print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    load1 = os.getloadavg()

    results, ok = {}, True
    for setting in settings:
        digests = {r["digest"] for p in args.processes for r in runs[setting][p]}
        skipped = [r["skipped"] for p in args.processes for r in runs[setting][p] if r["skipped"]]
        n = inputs["multi_records"] if setting == "multi" else inputs["video_records"]
        kept = {r["kept"] for p in args.processes for r in runs[setting][p]}
        identical = len(digests) == 1
        ok &= identical and kept == {n} and not skipped
        rows = {p: summarise(runs[setting][p], p, units[setting]) for p in args.processes}
        base = rows[args.processes[0]]
        for row in rows.values():
            row["speed_up"] = base["wall_s"] / row["wall_s"]
            row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
        results[setting] = {"rows": rows, "byte_identical": identical, "kept": sorted(kept), "skipped": skipped,
                            "units": units[setting]}

    unit_names = {"multi": ["images"], **{f"video-{k}": ["frames_decoded", "frames_sampled"] for k in shape["num_frames"]}}
    print("\n| records | processes | wall s | samples/s | speed-up | per process: samples/s | samples/CPU-s | "
          "images or frames (decoded; sampled) per CPU-s | CPU s (all processes) | byte-identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        label = ("multi-image (2-6 per record)" if setting == "multi"
                 else f"video, num_frames {setting.split('-')[1]}")
        for p, row in results[setting]["rows"].items():
            per_cpu = "; ".join(f"{row[f'{u}_per_cpu_s']:,.0f}" for u in unit_names[setting])
            print(f"| {label} | {p} | {row['wall_s']:.2f} | {row['samples_per_s']:,.1f} | {row['speed_up']:.2f}x | "
                  f"{row['samples_per_s_per_process']:,.1f} | {row['samples_per_cpu_s']:,.1f} | {per_cpu} | "
                  f"{row['cpu_s']:.2f} | {results[setting]['byte_identical']} |")
    for setting in settings[1:]:
        u = units[setting]
        print(f"{setting}: {u['frames_decoded']:,} frames decoded, {u['frames_sampled']:,} sampled per build")
    print(f"\nload average {load0[0]:.1f} -> {load1[0]:.1f}; every output byte-identical across process counts and "
          f"repetitions, every record kept: {ok}")
    if args.json:
        out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "shape": shape, "processes": args.processes, "inputs": {k: v for k, v in inputs.items()
                                                                       if k != "clip_frames"},
               "clip_frames": lengths, "results": results, "load": [load0, load1],
               "runs": {s: {str(p): v for p, v in r.items()} for s, r in runs.items()}}
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
