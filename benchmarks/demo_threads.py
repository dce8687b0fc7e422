"""CPU threads and loader workers for the demo's shapes: `mmloom train` steps of the vision demo's
phase 1 and phase 2 at torch intra-op threads 1 vs 2 and DataLoader workers 0 vs 1.

    python benchmarks/demo_threads.py                 # quiet machine: 60 steps per run, 2 repetitions
    python benchmarks/demo_threads.py --busy          # the same beside one `python -c "while True: pass"`
    python benchmarks/demo_threads.py --steps 20 --repeats 1 --json out.json

Data: the quick demo's scenes (1,500 training scenes, `mmloom.demo.scenes`), its tokenizer and HDF5
builds, built once in a temporary folder. Model and batch: the full demo's (a 48-px CLIP of 3 layers,
a 4-layer Llama of hidden 128, batch 32). Each run is a real `mmloom train` subprocess with
`runconfig.num_threads` and `train_input.num_workers` set; the variants alternate within each
repetition. Reported per variant: the median step time over the log windows after the first (wall
seconds per optimizer step, from metrics.jsonl: start-up excluded), and the CPU seconds per step of
the whole process tree (start-up included, so only comparable between variants). `--busy` starts one
CPU-bound process for the whole measurement, as a machine shared with one other job.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mmloom.demo import pipeline, steps
from mmloom.demo.scenes import write_dataset

VARIANTS = [(1, 0), (1, 1), (2, 0), (2, 1)]  # (torch intra-op threads, DataLoader workers)


def prepare(out: Path) -> tuple[int, int]:
    """The quick demo's scenes, tokenizer and HDF5 data in `out`; returns (vocab size, <image> id)."""
    size = pipeline.QUICK
    steps.prepare_output(out)
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0)
    vocab, image_id = steps.train_tokenizer(out, ["<image>"], "<image>")
    steps.build_data(steps.Runner(out), out, pipeline.dataset_section(out))
    return vocab, image_id


def run_variant(out: Path, phase: int, threads: int, workers: int, num_steps: int, vocab: int, image_id: int,
                tag: str) -> dict:
    """One `mmloom train` run of `num_steps` steps; returns step time (s, median of later windows) and CPU s/step."""
    size = steps.DemoSize(pipeline.QUICK.num_train, pipeline.QUICK.num_eval, num_steps, num_steps,
                          pipeline.FULL.batch_size)
    config = pipeline.vision_train_config(out, phase, size, vocab, image_id)
    config["train_input"]["num_workers"] = workers
    config["runconfig"].update({"num_threads": threads, "log_steps": max(num_steps // 6, 1),
                                "checkpoint_steps": None, "keep_last": None, "save_final_model": False})
    path = out / "configs" / f"bench_{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = out / "bench" / tag
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmloom", "train", str(path), "--model-dir", str(run_dir)], check=True,
                   stdout=subprocess.DEVNULL, env=steps.Runner(out).env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [w["step_time_s"] for w in windows if "step_time_s" in w][1:]
    return {"step_s": statistics.median(times), "cpu_per_step_s": cpu / num_steps, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions of every variant (default 2)")
    parser.add_argument("--busy", action="store_true", help="measure beside one CPU-bound process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 12:
        parser.error("--steps must be at least 12 (two log windows after the first)")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mmloom-demo-threads-") as tmp:
        out = Path(tmp) / "demo"
        vocab, image_id = prepare(out)
        # phase 2 starts from a phase-1 model (runs/phase1/final_model), as in the demo
        config = pipeline.vision_train_config(out, 1, steps.DemoSize(100, 10, 2, 2, 4), vocab, image_id)
        start = out / "configs" / "phase1_start.yaml"
        start.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([sys.executable, "-m", "mmloom", "train", str(start), "--model-dir",
                        str(out / "runs" / "phase1")], check=True, stdout=subprocess.DEVNULL, env=steps.Runner(out).env)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
        try:
            for rep in range(args.repeats):
                for phase in (1, 2):
                    for threads, workers in VARIANTS:
                        key = f"phase{phase} threads={threads} workers={workers}"
                        res = run_variant(out, phase, threads, workers, args.steps, vocab, image_id,
                                          f"p{phase}_t{threads}_w{workers}_r{rep}")
                        results.setdefault(key, []).append(res)
                        print(f"{key}: {res['step_s'] * 1000:.0f} ms/step, {res['cpu_per_step_s'] * 1000:.0f} "
                              f"CPU-ms/step", flush=True)
        finally:
            if busy is not None:
                busy.kill()
    print(f"\n{'variant':<34} {'ms/step (median)':>17} {'CPU-ms/step':>12}")
    table = {}
    for key, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        cpu = statistics.median(r["cpu_per_step_s"] for r in runs)
        table[key] = {"step_s": step, "cpu_per_step_s": cpu, "runs": runs}
        print(f"{key:<34} {step * 1000:>17.0f} {cpu * 1000:>12.0f}")
    if args.json:
        args.json.write_text(json.dumps({"busy": args.busy, "steps": args.steps, "results": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
