"""Benchmark sequence packing: a short tiny phase-2 run, padded vs length-grouped vs packed.

    python benchmarks/packing.py                       # 768 records, MSL 768, 3 repetitions
    python benchmarks/packing.py --msl 1024 --reps 5 --micro-batch 16 --llm-hidden 256 --llm-layers 4

Builds a LLaVA-mix665k-like data set with `mmloom data build` (vicuna_v1, 16 image slots of
32px images, the offline tiny tokenizer): mostly short VQA (one short answer), some multi-turn
conversations, some long descriptions and ~6% long text-only conversations, so most samples
are far shorter than the MSL. It then runs `mmloom train` (configs/tiny/phase2.yaml, same seed,
same samples per step) with `train_input.packing` off/on (and `group_by_length`), alternating,
and prints the effective (non-pad) tokens/s and samples/s of each, and the ratios to padded.
The first `--warmup` steps of every run are not timed. Runs on the CPU unless CUDA is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a red blue green yellow circle square star triangle left right above below shape colour "
         "picture image question answer there is are two three one small large near far bright dark "
         "quick brown fox jumps over lazy dog chat assistant helpful detailed polite").split()
SHORT_Q = ["What colour is the shape?", "How many shapes are there?", "Is there a circle?",
           "Where is the square?"]
SINGLE = " Answer the question using a single word or phrase."


def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1)))).capitalize() + "."


def record(i: int, rng) -> dict:
    """One record of a mix665k-like mixture (the shares roughly follow LLaVA-1.5's data)."""
    kind = rng.choice(["vqa", "conv", "detail", "text"], p=[0.5, 0.3, 0.14, 0.06])
    turns = []
    if kind == "vqa":  # VQAv2/GQA/OCR-VQA style: a few single-word questions
        for _ in range(int(rng.integers(1, 4))):
            turns += [{"from": "human", "value": str(rng.choice(SHORT_Q)) + SINGLE},
                      {"from": "gpt", "value": str(rng.choice(["Yes.", "No.", "Red.", "Two.", "Left."]))}]
    elif kind == "conv":  # LLaVA conversations: several medium turns
        for _ in range(int(rng.integers(2, 6))):
            turns += [{"from": "human", "value": sentence(rng, 4, 10)[:-1] + "?"},
                      {"from": "gpt", "value": " ".join(sentence(rng, 6, 14) for _ in range(int(rng.integers(1, 3))))}]
    elif kind == "detail":  # detailed descriptions: one long answer
        turns += [{"from": "human", "value": "Describe the picture in detail."},
                  {"from": "gpt", "value": " ".join(sentence(rng, 8, 16) for _ in range(int(rng.integers(3, 7))))}]
    else:  # ShareGPT-like text-only: long multi-turn
        for _ in range(int(rng.integers(2, 5))):
            turns += [{"from": "human", "value": sentence(rng, 6, 14)},
                      {"from": "gpt", "value": " ".join(sentence(rng, 8, 16) for _ in range(int(rng.integers(2, 4))))}]
    rec = {"id": str(i), "conversations": turns}
    if kind != "text":
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        rec["image"] = f"img{i % 32}.png"
    return rec


def make_data(root: Path, n: int, msl: int) -> Path:
    from PIL import Image

    from mmloom.cli.main import main
    from mmloom.testing import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(root / "tok")
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(32):
        arr = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
    (root / "jsonl").mkdir(exist_ok=True)
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(record(i, rng)) + "\n" for i in range(n)))
    cfg = {"setup": {"input_dir": str(root / "jsonl"), "output_dir": str(root / "h5"), "processes": 1,
                     "samples_per_file": 1000},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": msl},
           "dataset": {"num_patches": 16, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1"}}
    import yaml

    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet", "--overwrite"]) == 0
    return root / "h5"


def run(data: Path, model_dir: Path, args, *sets: str) -> dict:
    from mmloom.cli.main import main

    start = json.loads((data / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
    steps = args.warmup + args.steps
    argv = ["train", str(ROOT / "configs" / "tiny" / "phase2.yaml"), "--model-dir", str(model_dir), "--mode", "train"]
    for s in (f"train_input.data_dir={data}", f"train_input.img_data_dir={data.parent / 'images'}",
              f"eval_input.data_dir={data}", f"eval_input.img_data_dir={data.parent / 'images'}",
              f"model.image_start_idx={start}", "runconfig.checkpoint_path=null", f"runconfig.max_steps={steps}",
              "runconfig.log_steps=1",
              "runconfig.save_final_model=false", f"runconfig.checkpoint_steps={steps}", "runconfig.keep_last=1",
              f"train_input.batch_size={args.batch}", f"train_input.micro_batch_size={args.micro_batch}",
              f"model.text_model.hidden_size={args.llm_hidden}", f"model.text_model.intermediate_size={2 * args.llm_hidden}",
              f"model.text_model.num_hidden_layers={args.llm_layers}", f"model.precision={args.precision}",
              f"model.attn_implementation={args.attn}", *sets):
        argv += ["--set", s]
    t0 = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    time_s, tokens, samples, losses = 0.0, 0.0, 0.0, {}
    for r in timed:  # one-step windows
        t = r["step_time_s"]
        time_s += t
        tokens += r["tokens_per_s"] * t
        samples += r["samples_per_s"] * t
    for r in records:
        if "loss" in r:
            losses[r["step"]] = r["loss"]
    return {"tokens_per_s": tokens / time_s, "samples_per_s": samples / time_s, "wall_s": wall, "losses": losses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=768, help="records (default 768)")
    ap.add_argument("--msl", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per micro-batch (default 16)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, modes alternating (default 3)")
    ap.add_argument("--modes", nargs="+", default=["padded", "grouped", "packed"])
    ap.add_argument("--llm-hidden", type=int, default=48, help="tiny LLM width (phase2.yaml: 48)")
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmloom.data.hdf5_dataset import HDF5LlavaDataset
    from mmloom.data.sampling import sample_lengths

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    data = make_data(root / "data", args.n, args.msl)
    lengths = sample_lengths(HDF5LlavaDataset(data, None, None))
    print(f"data: {len(lengths)} samples kept of {args.n}, MSL {args.msl}; sample length (tokens incl. image "
          f"slots) mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
          f"max {lengths.max()}; real tokens / padded tokens = {lengths.mean() / args.msl:.2f}")
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"run: tiny phase 2 (LLM hidden {args.llm_hidden}, {args.llm_layers} layers, {args.precision}, "
          f"{args.attn}), batch {args.batch}, micro-batch {args.micro_batch}, {args.steps} timed steps after "
          f"{args.warmup}; device {device}", flush=True)
    sets = {"padded": [], "grouped": ["train_input.group_by_length=true"], "packed": ["train_input.packing=true"]}
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.reps):
        for mode in args.modes:
            res = run(data, root / "runs" / f"{mode}_{rep}", args, *sets[mode])
            results[mode].append(res)
            print(f"rep {rep} {mode:8s} effective tokens/s {res['tokens_per_s']:9.0f}  samples/s "
                  f"{res['samples_per_s']:7.1f}", flush=True)
    base = args.modes[0]
    print("\nmode      tokens/s (median)  samples/s (median)  ratio vs " + base)
    med = {m: (float(np.median([r["tokens_per_s"] for r in rs])), float(np.median([r["samples_per_s"] for r in rs])))
           for m, rs in results.items()}
    for m, (tok, smp) in med.items():
        print(f"{m:8s}  {tok:17.0f}  {smp:18.1f}  {tok / med[base][0]:.2f}x")
    ref = results[base][0]["losses"]
    for m, rs in results.items():
        diff = max(abs(rs[0]["losses"][s] - ref[s]) for s in ref)
        print(f"max |loss - {base} loss| over steps, {m}: {diff:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
