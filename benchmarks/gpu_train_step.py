"""A training step at LLaVA-7B's shapes on one GPU: mmloom's packed rows with flash-attention varlen
vs transformers' padding-free packing with flash attention (the strongest GPU baseline) and vs
transformers' padded batches; tokens/s, MFU against the device's peak, ratios.

    python benchmarks/gpu_train_step.py                     # CUDA, bf16, flash_attention_2, 4 decoder layers
    python benchmarks/gpu_train_step.py --layers 8 --repeats 5 --json out.json
    python benchmarks/gpu_train_step.py --attn sdpa         # without the flash-attn package
    python benchmarks/gpu_train_step.py --smoke             # tiny shapes on the CPU, seconds (tests)

Model: CLIP-L/14-336's vision tower (hidden 1024, 24 layers, 576 image tokens) + `mlp2x_gelu` +
a Vicuna-7B-shaped decoder (hidden 4096, MLP 11008, 32 heads of 128, vocabulary 32000) cut to
`--layers` decoder layers (the per-layer work of a 7B is what is measured; the LM head keeps its
full size), random weights, the same on every side (mmloom's `builder.build_model`, copied into
transformers' `LlavaForConditionalGeneration`). Phase 2: the vision tower frozen, projector + LLM
train; float32 master weights under bf16 autocast (the trainer's `precision: bfloat16`), fused
AdamW, clipping at 1.0, no gradient checkpointing. The vision tower runs SDPA on every side (its
images are whole; transformers' Llava also hands the text's varlen arguments to its vision tower,
which only SDPA ignores), the decoder runs `--attn`.

Data: the LLaVA-shaped pool of `train_step.py` (mix665k-like: 6% text-only, median ~780 tokens
with the 576 image slots, MSL 2048), one global batch of `--pool` samples per optimizer step, cut
into micro-batches of `--batch` samples by each variant (gradient accumulation):
- `mmloom-pack`: `train_input.packing` (`PackedStepSampler`: micro-batches at even token counts;
  `PackedCollator`: one padding-free row per micro-batch with its `cu_seq_lens`; flash-attention
  varlen), LM head and loss at supervised positions only;
- `hf-packed`: transformers' padding-free packing: random micro-batches flattened by
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` (restarting `position_ids` and the
  varlen boundaries handed to flash attention), full-vocabulary logits;
- `hf-padded`: transformers' padded batches: random micro-batches right-padded to their longest
  sample, with the attention mask (flash attention unpads them; the rest of the model computes
  the padding).
Every variant computes the gradient of the same loss (sum of token losses / the pool's supervised
tokens) on the same samples; their losses before any update are printed side by side.

Timing: per repetition, each variant (order rotated) starts from the same weights, runs
`--warmup` steps, then `--steps` timed steps (CUDA synchronised, wall clock); tokens/s counts
the pool's real tokens (never padding). MFU = model FLOPs per step / step time / the device's
dense bf16 peak (`PEAK_TFLOPS` by device name, or `--peak-tflops`); model FLOPs from mmloom's
`FlopsEstimator` for the pool with the LM head at every real token and the frozen tower's forward
(the usual 6N-per-token count plus attention): the same work for every variant, so the MFU ratio is
the speed ratio. Ratios are taken within a repetition: median [min, max].
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402 - the pool, the samplers and the HF Llava copy of train_step.py

VARIANTS = ("mmloom-pack", "hf-packed", "hf-padded")
BASELINE = "hf-packed"
# Dense bf16 tensor-core peaks (NVIDIA datasheets), matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
               ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))
SHAPES = {
    "7b": dict(vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16),
               text=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         head_dim=128, rms_norm_eps=1e-5),
               vocab=32000, pool=128, batch=16, layers=4),
    "smoke": dict(vision=ts.CONFIGS["smoke"]["vision"], text={k: v for k, v in ts.CONFIGS["smoke"]["text"].items()
                                                              if k != "num_hidden_layers"},
                  vocab=64, pool=8, batch=4, layers=1),
}


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOPS or None, where it came from)."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"{name}: datasheet dense bf16"
    return None, f"{name}: unknown peak (give --peak-tflops)"


def data_config(shape: dict, pool: int, smoke: bool) -> dict:
    """train_step.py's pool settings (LLaVA-1.5's data; smoke: its tiny ones) at this model's shapes."""
    base = ts.CONFIGS["smoke" if smoke else "llava"]
    return {**base, "vision": shape["vision"], "text": {**shape["text"], "num_hidden_layers": shape["layers"]},
            "pool": pool, "ranks": 1}


# ------------------------------------------------------------------------------------ batches
def hf_flattened(items: list[dict], images: list) -> dict:
    """transformers' padding-free micro-batch: one row, restarting position ids, flash varlen kwargs."""
    from transformers import DataCollatorWithFlattening

    out = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(
        [{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
    batch = {k: out[k] for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                 "max_length_q", "max_length_k")}
    return {**batch, "attention_mask": None, "pixel_values": torch.stack(images) if images else None}


def build_batches(samples: list[dict], cfg: dict, n_img: int, vocab: int, images: list, micro: int,
                  seed: int) -> dict:
    """Per variant: its micro-batches of the pool (CPU tensors)."""
    from mmloom.data.collate import PackedCollator, TrainCollator

    image_token = vocab - 1
    sched = ts.schedules(samples, n_img, micro, 1, seed, cfg["msl"], False)
    h5 = [ts.hdf5_item(s, cfg, n_img, images[i]) for i, s in enumerate(samples)]
    hf = [ts.hf_item(s, cfg, n_img, image_token) for s in samples]
    pack = PackedCollator(TrainCollator(image_token, ts.PAD, n_img))

    def hf_images(mb):
        return [images[i] for i in mb if samples[i]["has_image"]]

    return {
        "mmloom-pack": [pack([h5[i] for i in mb]) for mb, _ in sched["mmloom-pack"]],
        "hf-packed": [hf_flattened([hf[i] for i in mb], hf_images(mb)) for mb, _ in sched["random"]],
        "hf-padded": [ts.hf_padded([hf[i] for i in mb], hf_images(mb)) for mb, _ in sched["random"]],
    }


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------- models
def build_models(cfg: dict, vocab: int, attn: str):
    """The mmloom composite (CPU, float32) and transformers' Llava with a copy of its weights, each
    set to its attention: the decoder `attn`, the vision tower SDPA."""
    from mmloom.model.attention import VARLEN_ATTENTION, use_packed_attention
    from mmloom.training import builder

    section = ts.model_section(cfg, vocab)
    model = builder.build_model(section, seed=0)
    model.freeze(section.freeze)
    model.train()
    hf = ts.llava_like(model, section.image_token_id)
    if attn != "sdpa":
        model.language_model.set_attn_implementation(attn)
        hf.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    use_packed_attention(model.language_model)  # flash stays flash; sdpa becomes mmloom's per-sample SDPA
    got = {"mmloom decoder": model.language_model.config._attn_implementation,
           "mmloom vision": model.encoders["vision"].module.config._attn_implementation,
           "transformers decoder": hf.model.language_model.config._attn_implementation,
           "transformers vision": hf.model.vision_tower.config._attn_implementation}
    want = {"mmloom decoder": attn if attn != "sdpa" else VARLEN_ATTENTION, "mmloom vision": "sdpa",
            "transformers decoder": attn, "transformers vision": "sdpa"}
    if got != want:  # never compare implementations other than the ones asked for
        raise RuntimeError(f"attention implementations {got}, expected {want}")
    return model, hf


class Runner:
    """One variant on the device: its own copy of the weights and fused AdamW."""

    def __init__(self, name: str, master, batches: list, denominator: float, device: torch.device, precision: str):
        self.name, self.hf, self.device = name, name.startswith("hf"), device
        self.model = copy.deepcopy(master).to(device)
        self.batches = batches
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.0, **fused)
        self.denominator = torch.tensor(denominator, device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bfloat16"
                         else torch.autocast(device.type, enabled=False))

    def loss(self, b: dict) -> torch.Tensor:
        with self.autocast:
            if self.hf:
                extra = {k: b[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                           "max_length_k") if b.get(k) is not None}
                return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                  pixel_values=b["pixel_values"], num_items_in_batch=self.denominator,
                                  use_cache=False, **extra).loss
            from mmloom.model.batch import model_inputs

            return self.model(**model_inputs(b), labels=b["labels"], num_items_in_batch=self.denominator,
                              compute_logits=False).loss

    def step(self) -> float:
        """One optimizer step over all micro-batches; returns the step's loss (sum over micro-batches)."""
        total = torch.zeros((), device=self.device)
        for b in self.batches:
            loss = self.loss(b)
            loss.backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, master, batches, denominator, device, args) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = Runner(name, master, batches, denominator, device, args.precision)
    first_loss = None
    for _ in range(args.warmup):
        loss = runner.step()
        first_loss = loss if first_loss is None else first_loss
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = runner.step()  # float(): waits for the step's last kernel
        sync(device)
        times.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del runner
    return {"step_s": statistics.mean(times), "first_loss": first_loss, "max_memory_bytes": memory}


# ---------------------------------------------------------------------------------------- run
def summarise(reps: dict, real_tokens: int, flops: float, peak: float | None) -> dict:
    out = {}
    for name, rs in reps.items():
        steps = [r["step_s"] for r in rs]

        def ratio(base, rs=rs):
            xs = [b["step_s"] / a["step_s"] for a, b in zip(rs, reps[base], strict=True)]
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

        step = statistics.median(steps)
        out[name] = {
            "step_s": {"median": step, "min": min(steps), "max": max(steps), "all": steps},
            "tokens_per_s": real_tokens / step,
            "mfu": flops / step / (peak * 1e12) if peak else None,
            "vs_hf_packed": ratio("hf-packed"), "vs_hf_padded": ratio("hf-padded"),
            "first_loss": [r["first_loss"] for r in rs],
            "max_memory_gib": max((r["max_memory_bytes"] or 0) for r in rs) / 2**30 if rs[0]["max_memory_bytes"] else None,
        }
    return out


def print_table(res: dict, peak_note: str) -> None:
    print(f"\nMFU against: {peak_note}")
    print("| variant | step s [min, max] | tokens/s | MFU | vs hf-packed [min, max] | vs hf-padded [min, max] "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name, v in res.items():
        s, a, b = v["step_s"], v["vs_hf_packed"], v["vs_hf_padded"]
        mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
        mem = f"{v['max_memory_gib']:.1f} GiB" if v["max_memory_gib"] is not None else "n/a"
        print(f"| {name} | {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] | {v['tokens_per_s']:,.0f} | {mfu} "
              f"| {a['median']:.2f}x [{a['min']:.2f}, {a['max']:.2f}] | {b['median']:.2f}x [{b['min']:.2f}, "
              f"{b['max']:.2f}] | {mem} |")
    losses = {n: v["first_loss"][0] for n, v in res.items()}
    print("loss before any update, same weights and samples: "
          + ", ".join(f"{n} {x:.6f}" for n, x in losses.items()))


def check_args(args, shape: dict) -> str | None:
    """Why the settings cannot run (one line), or None."""
    for name in ("layers", "pool", "batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if args.warmup < 0:
        return f"--warmup must be at least 0, got {args.warmup}"
    if args.pool % args.batch:
        return f"--pool {args.pool} is not a whole number of micro-batches of {args.batch}"
    if not args.smoke and not torch.cuda.is_available():
        return "no CUDA device: this benchmark measures a GPU (--smoke runs it on the CPU)"
    if args.attn.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if args.smoke:
            return f"--attn {args.attn} needs a CUDA device (--smoke runs on the CPU, with sdpa)"
        available = is_flash_attn_3_available() if args.attn == "flash_attention_3" else is_flash_attn_2_available()
        if not available:
            return f"--attn {args.attn} needs the flash-attn package (`pip install flash-attn`); or give --attn sdpa"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32, SDPA: checks the script")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    ap.add_argument("--pool", type=int, default=None, help="samples per optimizer step (default 128)")
    ap.add_argument("--batch", type=int, default=None, help="samples per micro-batch (default 16)")
    ap.add_argument("--attn", default=None, choices=["flash_attention_2", "flash_attention_3", "sdpa"],
                    help="the decoder's attention (default flash_attention_2; smoke: sdpa)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and repetition")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant and repetition (default 3)")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions, variants rotated (default 3)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOPS")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    shape = SHAPES["smoke" if args.smoke else "7b"]
    args.layers = args.layers if args.layers is not None else shape["layers"]
    args.pool = args.pool if args.pool is not None else shape["pool"]
    args.batch = args.batch if args.batch is not None else shape["batch"]
    args.attn = args.attn or ("sdpa" if args.smoke else "flash_attention_2")
    args.steps = args.steps if args.steps is not None else (1 if args.smoke else 3)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    args.precision = "float32" if args.smoke else "bfloat16"
    shape = {**shape, "layers": args.layers}
    problem = check_args(args, shape)
    if problem:
        print(f"gpu_train_step.py: error: {problem}", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device("cpu" if args.smoke else "cuda")
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    t_start = time.time()

    cfg = data_config(shape, args.pool, args.smoke)
    vocab = shape["vocab"]
    mm, hf = build_models(cfg, vocab, args.attn)
    n_img = mm.num_feature_tokens("vision")
    samples = ts.make_pool(cfg, n_img, vocab, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    size = cfg["vision"]["image_size"]
    images = [torch.randn(3, size, size, generator=gen) for _ in samples]
    batches = build_batches(samples, cfg, n_img, vocab, images, args.batch, args.seed)
    stats = {n: [ts.batch_stats(n, b) for b in bs] for n, bs in batches.items()}
    real = {n: sum(s["real"] for s in st) for n, st in stats.items()}
    sup = {n: sum(s["sup"] for s in st) for n, st in stats.items()}
    assert len(set(real.values())) == 1, f"real tokens differ between variants: {real}"
    assert len(set(sup.values())) == 1, f"supervised tokens differ between variants: {sup}"
    real_tokens, supervised = real["mmloom-pack"], sup["mmloom-pack"]
    batches = {n: [to_device(b, device) for b in bs] for n, bs in batches.items()}

    from mmloom.training.metrics import FlopsEstimator

    est = FlopsEstimator(mm, image_positions=(size // cfg["vision"]["patch_size"]) ** 2 + 1, feature_tokens=n_img)
    flops = est.flops(ts.pool_work(samples, n_img, supervised_only=False))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    params = sum(p.numel() for p in mm.parameters())
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; {args.precision}, "
          f"decoder attention {args.attn}")
    print(f"model: CLIP {size}px/{cfg['vision']['patch_size']} ({n_img} image tokens) + Llama hidden "
          f"{cfg['text']['hidden_size']} x {args.layers} layers, vocab {vocab}: {params / 1e9:.2f}B parameters")
    print(f"step: {len(samples)} samples ({sum(not s['has_image'] for s in samples)} text-only), {real_tokens:,} real "
          f"tokens, {supervised:,} supervised; micro-batches of {args.batch}; {flops / 1e12:.1f} model TFLOPs")

    masters = {"mmloom-pack": mm, "hf-packed": hf, "hf-padded": hf}
    reps = {n: [] for n in VARIANTS}
    for rep in range(args.repeats):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
        for variant in order:
            reps[variant].append(run_variant(variant, masters[variant], batches[variant], float(supervised), device,
                                             args))
        print(f"  repetition {rep + 1}/{args.repeats}: "
              + ", ".join(f"{n} {reps[n][-1]['step_s']:.3f}s" for n in VARIANTS), flush=True)
    res = summarise(reps, real_tokens, flops, peak)
    print_table(res, peak_note)
    print(f"wall {time.time() - t_start:.0f} s")
    if args.json:
        out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
               "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args),
               "peak_tflops": peak, "peak_source": peak_note, "real_tokens": real_tokens,
               "supervised_tokens": supervised, "model_flops": flops, "parameters": params, "results": res}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
