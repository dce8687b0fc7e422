"""Start-up of `mmloom train` on 2 gloo ranks: host memory per rank and time to the first step,
for a ~1B-parameter composite started from HF component folders.

    python benchmarks/startup_memory.py --work DIR                       # FSDP2, this checkout
    python benchmarks/startup_memory.py --work DIR --distributed ddp
    python benchmarks/startup_memory.py --work DIR --src OTHER_CHECKOUT  # e.g. the revision before
    python benchmarks/startup_memory.py --work DIR --smoke               # tiny model, seconds

The model (written once into DIR/model): CLIP-L/14's vision tower at 224 px (hidden 1024, 24
layers: 303M parameters) and a Llama-shaped LLM (hidden 2048, MLP 5632, 12 layers, 16 heads, vocab
32000: 748M), as HF folders in bfloat16 (as published checkpoints are), random weights; the
trainer adds an mlp2x_gelu projector: 1.05B parameters, 4.2 GB in float32 (the trainer's master
weights). The data (DIR/data): 8 LLaVA records with 224 px images built into HDF5 (plain template,
256 image slots, MSL 320). The run: `mmloom train` through its CLI under torchrun, 2 processes with
one torch thread each, phase 1 (the projector trains; vision tower and LLM frozen: the first step
adds activations, no optimizer state for the 1B frozen weights), global batch 2, float32.

Per rank: resident memory after the imports, the peak resident memory (`ru_maxrss`: everything the
process ever held, file pages it mapped included) when the model is ready (the trainer's `model_at`
returned: built, loaded, sharded or wrapped) and after the first optimizer step, and the seconds
from the process start to both (wall clock, and the process's CPU time: less sensitive to other
work on a shared machine). The worker imports mmloom from `--src` (default: this checkout), so
one script measures any revision. After the first step the ranks exit (no checkpoint is written).
"""

from __future__ import annotations

import time

T0 = time.time()  # the process start, before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
               text=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512),
               msl=320),
    "smoke": dict(vision=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
                  text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
                  msl=64),
}


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------- inputs
def prepare(work: Path, shape: str) -> Path:
    """The HF folders, the HDF5 data and the training config in `work` (once); returns the config."""
    config = work / "train.yaml"
    if config.exists():
        return config
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmloom.cli.main import main as mmloom
    from mmloom.testing import tiny_tokenizer

    dims = SHAPES[shape]
    torch.manual_seed(0)
    (work / "model").mkdir(parents=True, exist_ok=True)
    vision = CLIPVisionModel(CLIPVisionConfig(**dims["vision"]))
    vision.to(torch.bfloat16).save_pretrained(work / "model" / "clip")
    del vision
    llm = LlamaForCausalLM(LlamaConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False,
                                       **dims["text"]))
    llm.to(torch.bfloat16).save_pretrained(work / "model" / "llama")
    del llm
    data = work / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(data / "tok")
    rng = np.random.default_rng(0)
    size = dims["vision"]["image_size"]
    records = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "A red circle on the left and a blue square." * (1 + i % 2)}]})
    (data / "jsonl").mkdir(exist_ok=True)
    (data / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    patches = (size // dims["vision"]["patch_size"]) ** 2
    build = {"setup": {"input_dir": str(data / "jsonl"), "output_dir": str(data / "h5"), "processes": 1},
             "processor": {"tokenizer_type": str(data / "tok"), "max_sequence_length": dims["msl"] + patches},
             "dataset": {"num_patches": patches, "image_dir": str(data / "images"), "system_prompt_style": "plain"}}
    (data / "build.yaml").write_text(yaml.safe_dump(build))
    assert mmloom(["data", "build", str(data / "build.yaml"), "--quiet", "--overwrite"]) == 0
    start = json.loads((data / "h5" / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
    cfg = {
        "train_input": {"data_dir": str(data / "h5"), "img_data_dir": str(data / "images"), "image_size": size,
                        "batch_size": 2, "micro_batch_size": 1, "shuffle": False, "num_workers": 0},
        "model": {"image_model": str(work / "model" / "clip"), "text_model": str(work / "model" / "llama"),
                  "projector": "mlp2x_gelu", "freeze": ["^image_model", "^text_model"],
                  "image_feature_select_layer_idx": -2, "image_feature_select_mode": "patch",
                  "image_start_idx": start, "image_token_id": 4, "pad_token_id": 3, "precision": "float32",
                  "attn_implementation": "sdpa"},
        "optimizer": {"optimizer_type": "AdamW", "lr": 1.0e-3},
        "runconfig": {"max_steps": 1, "log_steps": 1, "seed": 0, "save_final_model": False},
    }
    config.write_text(yaml.safe_dump(cfg))
    return config


# --------------------------------------------------------------------------------- worker
def worker(args) -> None:
    """One rank: `mmloom train` with the trainer's `model_at` (its model built, filled and checked) and
    `Trainer.optimizer_step` timed."""
    import torch  # noqa: F401 - counted in the imports, as in `mmloom train`

    import mmloom
    from mmloom.cli.main import main as mmloom_main
    from mmloom.training import loop

    after_imports = {"s": time.time() - T0, "rss_mib": rss_mib()}
    record: dict = {"mmloom": str(Path(mmloom.__file__).parent), "imports": after_imports,
                    "rank": int(os.environ.get("RANK", "0"))}
    # --src checkouts before the one model loader (34f95a2) built the model in `Trainer.setup_model`
    owner, name = (loop, "model_at") if hasattr(loop, "model_at") else (loop.Trainer, "setup_model")
    build, optimizer_step = getattr(owner, name), loop.Trainer.optimizer_step

    def timed_model(*a, **k):
        t = time.time()
        out = build(*a, **k)
        record["model_ready"] = {"s": time.time() - T0, "model_s": time.time() - t, "cpu_s": cpu_s(),
                                 "rss_mib": rss_mib(), "peak_rss_mib": peak_mib()}
        return out

    def timed_step(self, *a, **k):
        out = optimizer_step(self, *a, **k)
        record["first_step"] = {"s": time.time() - T0, "cpu_s": cpu_s(), "loss": out.loss, "rss_mib": rss_mib(),
                                "peak_rss_mib": peak_mib()}
        Path(args.out).write_text(json.dumps(record))
        self.ctx.barrier()
        os._exit(0)  # the measurement ends here: no checkpoint

    setattr(owner, name, timed_model)
    loop.Trainer.optimizer_step = timed_step
    mmloom_main(["train", args.config, "--model-dir", args.run_dir,
                 "--set", f"runconfig.distributed={args.distributed}"])


# ---------------------------------------------------------------------------- orchestrator
def measure(work: Path, config: Path, src: Path, distributed: str, label: str) -> list[dict]:
    out = work / "results"
    out.mkdir(exist_ok=True)
    run_dir = work / "runs" / label
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(src / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--config", str(config), "--run-dir", str(run_dir), "--distributed", distributed,
           "--out", str(out / f"{label}_rank%RANK%.json")]
    for rank in (0, 1):
        (out / f"{label}_rank{rank}.json").unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads((out / f"{label}_rank{rank}.json").read_text()) for rank in (0, 1)]


def report(label: str, ranks: list[dict]) -> None:
    print(f"\n{label}: mmloom from {ranks[0]['mmloom']}")
    print("| rank | RSS after imports | peak RSS, model ready | peak RSS, first step | model ready (CPU) "
          "| first step done (CPU) | model_at | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ranks:
        i, m, f = r["imports"], r["model_ready"], r["first_step"]
        print(f"| {r['rank']} | {i['rss_mib'] / 1024:.2f} GiB | {m['peak_rss_mib'] / 1024:.2f} GiB | "
              f"{f['peak_rss_mib'] / 1024:.2f} GiB | {m['s']:.1f} s ({m['cpu_s']:.1f} s) | {f['s']:.1f} s "
              f"({f['cpu_s']:.1f} s) | {m['model_s']:.1f} s | {f['loss']:.6f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="folder for the model, data and runs (reused)")
    ap.add_argument("--src", type=Path, default=ROOT, help="the mmloom checkout whose src/ the ranks import")
    ap.add_argument("--distributed", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks that the script runs")
    ap.add_argument("--label", default=None, help="name of this measurement (default: distributed mode + src)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-rank records here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.out = args.out.replace("%RANK%", os.environ.get("RANK", "0"))
        worker(args)
        return 0
    if args.work is None:
        ap.error("--work DIR is required")
    config = prepare(args.work, "smoke" if args.smoke else "1b")
    label = args.label or f"{args.distributed}-{args.src.resolve().name}"
    ranks = measure(args.work, config, args.src.resolve(), args.distributed, label)
    report(label, ranks)
    if args.json:
        args.json.write_text(json.dumps({"label": label, "distributed": args.distributed, "ranks": ranks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
