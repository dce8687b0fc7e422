"""Training-step throughput: mmloom vs transformers' `LlavaForConditionalGeneration`, same weights.

    python benchmarks/train_step.py --config small --phase 2 --steps 5 --repeats 3 [--packing]
    python benchmarks/train_step.py --config small --phase 1 --memory --profile --json out.json

One process builds an mmloom CLIP + Llama + mlp2x_gelu composite (through the trainer's own
`builder.build_model`, feature layer -2, CLS dropped) and a transformers Llava holding a copy of
exactly the same weights, then trains each on the same synthetic batches with the same AdamW
(+ gradient clipping at 1.0), alternating variant by variant inside every repetition (the order
rotates between repetitions), so load from other processes hits all variants alike. Ratios are
taken per repetition (adjacent measurements) and reported as median [min, max].

Variants (one micro-batch per optimizer step, no accumulation):
- `hf`: Llava, batch right-padded to the longest sample, full-logits loss (`out.loss`): what a
  transformers/HF-Trainer user runs;
- `mmloom-pad`: the same padded batch (mmloom's `TrainCollator(trim=True)`), LM head + loss only
  at supervised positions (`compute_logits=False`, what the trainer does by default);
- `mmloom-pack` (`--packing`, needs `mmloom.data.packing`): the step's samples packed into rows of
  at most MSL tokens (`PackedCollator`, block-diagonal 4D mask, restarting position_ids) + fast loss;
- `mmloom-msl` (`--pad-to-msl`): every row padded to MSL (the trainer's default collator without
  `group_by_length`/`packing`), fast loss.

Data: LLaVA-like synthetic samples. Phase 1 = `plain` captions: [bos] <image> caption (only the
caption is supervised, lengths log-normal, median ~12 tokens). Phase 2 = vicuna_v1 conversations
with a mix665k-like length distribution: text tokens log-normal (median = MSL/4, sigma 0.75, cut to
MSL): the real mix665k has a median of ~500 text tokens at MSL 2048; only answer tokens are
supervised. Token ids are random (the content does not change the cost).

Throughput: `tokens/s` counts attended (real) tokens only, image tokens included -- for padded
variants the padding is work but not counted, so tokens/s is the effective throughput everywhere;
`sup tok/s` counts supervised tokens; `rows tok/s` counts every position computed (padding too).

Memory (`--memory`): every variant runs again in its own subprocess (same batches, same steps);
the child reads its high-water RSS at the end (VmHWM in /proc/self/status: the same number as
`getrusage().ru_maxrss`, except that ru_maxrss is inherited from the parent across fork + exec, so
children of the big benchmark process would all report the parent's peak) and the RSS from
/proc/self/statm right before the first training step. Both children build
the same two models and drop the one they do not run, so construction costs are identical; the
reported `peak` is the high-water RSS and `train delta` = peak - RSS before training (weights
included in the former only). CPU RSS stands in for device memory here: it includes allocator
caching, so compare the two, not the absolute numbers.

Profile (`--profile`): one step of each variant under `torch.profiler` (CPU), top ops by self time
and the forward / backward / optimizer split.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

CONFIGS = {
    # CLIP 224 / patch 32 -> 49 image tokens; MSL 512 (LLaVA-1.5: 576 image tokens, MSL 2048)
    "small": dict(
        vision=dict(image_size=224, patch_size=32, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4),
        text=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
        msl=512, batch=8,
    ),
    "mid": dict(
        vision=dict(image_size=224, patch_size=32, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=6),
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=12),
        msl=512, batch=4,
    ),
}
PAD, BOS, EOS = 0, 1, 2
IGNORE = -100


# ----------------------------------------------------------------------------------- models
def model_section(cfg: dict, vocab: int, phase: int):
    from mmloom.training.config import ModelSection

    text = dict(model_type="llama", vocab_size=vocab, max_position_embeddings=cfg["msl"], bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False, **cfg["text"])
    vision = dict(model_type="clip_vision_model", projection_dim=cfg["vision"]["hidden_size"], **cfg["vision"])
    freeze = ["^image_model", "^text_model"] if phase == 1 else ["^image_model"]
    return ModelSection(image_model=vision, text_model=text, projector="mlp2x_gelu", freeze=freeze,
                        image_feature_select_layer_idx=-2, image_feature_select_mode="patch",
                        image_token_id=vocab - 1, pad_token_id=PAD, attn_implementation="sdpa")


def llava_like(model, image_token_id: int):
    """A transformers Llava holding a copy of the weights of an mmloom CLIP + Llama + mlp2x_gelu
    composite (feature layer -2, CLS dropped), the mapping of `mmloom.interop.hf_llava` (which
    shares modules for a one-way conversion; here the two models must train independently)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mmloom.interop.common import vision_parts

    parts = vision_parts(model, "hf-llava")
    assert parts.depth == 2 and parts.layer == -2 and parts.drops_cls
    llm = parts.language_model
    config = LlavaConfig(
        vision_config=parts.tower.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=model.num_feature_tokens("vision"),
        projector_hidden_act=parts.activation,
        vision_feature_layer=parts.layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=parts.bias,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower.load_state_dict(parts.tower.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(parts.projection[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(parts.projection[2].state_dict())
    hf.model.language_model.load_state_dict(llm.model.state_dict())
    hf.lm_head.load_state_dict(llm.lm_head.state_dict())
    return hf


def freeze_hf(hf, phase: int) -> None:
    """The same trainable set as mmloom's freeze patterns: phase 1 projector only, phase 2 + LLM."""
    hf.train()
    for p in hf.parameters():
        p.requires_grad_(False)
    trainable = [hf.model.multi_modal_projector]
    if phase == 2:
        trainable += [hf.model.language_model, hf.lm_head]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    hf.model.vision_tower.eval()
    if phase == 1:
        hf.model.language_model.eval()


def build_models(cfg: dict, vocab: int, phase: int, seed: int = 0):
    from mmloom.training import builder

    section = model_section(cfg, vocab, phase)
    model = builder.build_model(section, seed=seed)
    model.freeze(section.freeze)
    hf = llava_like(model, section.image_token_id)
    freeze_hf(hf, phase)
    return model, hf


# ------------------------------------------------------------------------------------- data
def lognormal(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), lo, hi))


def make_sample(rng, phase: int, msl: int, n_img: int, vocab: int) -> dict:
    """One HDF5-layout item (what `HDF5LlavaDataset` yields): image slots hold the pad id."""
    image_token = vocab - 1

    def text(n):
        return rng.integers(3, image_token, size=n).tolist()

    ids, sup = [BOS], [False]
    if phase == 1:  # plain: <image> caption \n
        ids += [PAD] * n_img
        sup += [False] * n_img
        cap = lognormal(rng, 12, 0.45, 3, msl - len(ids) - 1)
        ids += text(cap) + [EOS]
        sup += [True] * (cap + 1)
    else:  # vicuna_v1: system USER: <image>\n q ASSISTANT: a</s> USER: q ASSISTANT: a</s> ...
        budget = lognormal(rng, msl / 4, 0.75, 24, msl - n_img - 1)  # text tokens of the sample
        system = text(24)
        ids += system + text(2)
        ids += [PAD] * n_img
        sup += [False] * (len(system) + 2 + n_img)
        first = True
        while len(ids) - n_img < budget:
            q = lognormal(rng, 14 if first else 10, 0.6, 3, 120)
            a = lognormal(rng, 24, 1.0, 1, 300)
            turn_q = text(q + 4)  # question + "ASSISTANT:" ("USER:" counted in it)
            turn_a = text(a) + [EOS]
            ids += turn_q + turn_a
            sup += [False] * len(turn_q) + [True] * len(turn_a)
            first = False
        cut = min(len(ids), budget + n_img, msl)
        ids, sup = ids[:cut], sup[:cut]
    n = len(ids)
    text_ids = torch.full((msl,), PAD, dtype=torch.int32)
    text_ids[:n] = torch.tensor(ids, dtype=torch.int32)
    kpm = torch.ones(msl, dtype=torch.int32)
    kpm[:n] = 0
    loss_mask = torch.zeros(msl, dtype=torch.int32)  # loss_mask[t]: token t predicts a supervised t+1
    loss_mask[: n - 1] = torch.tensor(sup[1:n], dtype=torch.int32)
    return {"text_input_ids": text_ids, "key_padding_mask": kpm, "loss_mask": loss_mask,
            "has_image": True, "image_data": None}


def make_steps(cfg: dict, phase: int, n_img: int, vocab: int, steps: int, batch: int, seed: int = 1) -> list[list]:
    rng = np.random.default_rng(seed + 100 * phase)
    gen = torch.Generator().manual_seed(seed)
    size = cfg["vision"]["image_size"]
    out = []
    for _ in range(steps):
        items = [make_sample(rng, phase, cfg["msl"], n_img, vocab) for _ in range(batch)]
        for it in items:
            it["image_data"] = torch.randn(3, size, size, generator=gen)
        out.append(items)
    return out


def collators(image_token_id: int, n_img: int, msl: int):
    from mmloom.data.collate import TrainCollator

    out = {"pad": TrainCollator(image_token_id, PAD, n_img, trim=True),
           "msl": TrainCollator(image_token_id, PAD, n_img, trim=False)}
    try:
        from mmloom.data.collate import PackedCollator
    except ImportError:
        return out
    out["pack"] = PackedCollator(TrainCollator(image_token_id, PAD, n_img), msl)  # SDPA: 4D block mask
    return out


# ---------------------------------------------------------------------------------- variants
VARIANTS = {  # name: (model, collator)
    "hf": ("hf", "pad"),
    "mmloom-pad": ("mmloom", "pad"),
    "mmloom-pack": ("mmloom", "pack"),
    "mmloom-msl": ("mmloom", "msl"),
}


class Runner:
    def __init__(self, name: str, model, batches: list[dict]):
        self.name, self.model, self.batches = name, model, batches
        self.kind = VARIANTS[name][0]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.0)

    def loss(self, b: dict) -> torch.Tensor:
        if self.kind == "hf":
            return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                              pixel_values=b["pixel_values"]).loss
        extra = {"position_ids": b["position_ids"]} if b.get("position_ids") is not None else {}
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                          pixel_values=b["pixel_values"], compute_logits=False,
                          num_items_in_batch=torch.tensor(float(max(b["num_loss_tokens"], 1))), **extra).loss

    def step(self, b: dict, profile_labels: bool = False) -> float:
        from torch.profiler import record_function

        ctx = record_function if profile_labels else (lambda _n: _null())
        with ctx("forward"):
            loss = self.loss(b)
        with ctx("backward"):
            loss.backward()
        with ctx("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed(self, steps: int) -> dict:
        t = dict(time=0.0, tokens=0, samples=0, sup=0, rows_tokens=0)
        for b in self.batches[:steps]:
            t0 = time.perf_counter()
            self.step(b)
            t["time"] += time.perf_counter() - t0
            t["tokens"] += b["num_attended_tokens"]
            t["samples"] += b["num_samples"]
            t["sup"] += b["num_loss_tokens"]
            t["rows_tokens"] += int(b["input_ids"].numel())
        return t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def prepare(args, names: list[str]):
    cfg = copy.deepcopy(CONFIGS[args.config])
    torch.manual_seed(0)
    model, hf = build_models(cfg, args.vocab, args.phase)
    n_img = model.num_feature_tokens("vision")
    image_token_id = model.placeholder_token_ids["vision"]
    raw = make_steps(cfg, args.phase, n_img, args.vocab, args.steps, args.batch or cfg["batch"])
    colls = collators(image_token_id, n_img, cfg["msl"])
    batches = {c: [colls[c](items) for items in raw] for c in {VARIANTS[n][1] for n in names}}
    models = {"hf": hf}
    mm_names = [n for n in names if VARIANTS[n][0] == "mmloom"]
    for i, n in enumerate(mm_names):  # every mmloom variant trains its own copy
        models[n] = model if i == len(mm_names) - 1 else copy.deepcopy(model)
    runners = {n: Runner(n, models["hf" if n == "hf" else n], batches[VARIANTS[n][1]]) for n in names}
    return cfg, n_img, runners, batches


def lm_head_share(cfg: dict, vocab: int, tokens_mean: float) -> float:
    t = cfg["text"]
    d, f, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = d * t["num_key_value_heads"] // t["num_attention_heads"]
    per_token = L * 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + L * 4 * tokens_mean * d
    return 2 * d * vocab / (per_token + 2 * d * vocab)


# ------------------------------------------------------------------------------------ memory
def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def hwm_kb() -> int:
    """The process' RSS high-water mark (VmHWM). Unlike `ru_maxrss`, which Linux carries over from
    the parent through fork + exec (the children would report the parent's peak), VmHWM belongs to
    the address space that exec creates."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_memory(args) -> None:
    name = args.child_memory
    names = ["hf", name] if name != "hf" else ["hf"]
    cfg, n_img, runners, batches = prepare(args, names)
    runner = runners[name]
    del runners
    gc.collect()
    before = rss_kb()
    runner.timed(args.steps)
    peak = hwm_kb()
    print("MEMORY " + json.dumps({"variant": name, "peak_kb": peak, "before_kb": before}))


def measure_memory(args, names: list[str]) -> dict:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--config", args.config, "--phase", str(args.phase), "--steps",
               str(args.steps), "--vocab", str(args.vocab), "--child-memory", name]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(x for x in res.stdout.splitlines() if x.startswith("MEMORY "))
        rec = json.loads(line[len("MEMORY "):])
        out[name] = {"peak_mib": rec["peak_kb"] / 1024, "train_delta_mib": (rec["peak_kb"] - rec["before_kb"]) / 1024}
    return out


# ----------------------------------------------------------------------------------- profile
def profile(runners: dict, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    out = {}
    for name, r in runners.items():
        b = r.batches[0]
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            r.step(b, profile_labels=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        phases = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in ("forward", "backward", "optimizer")}
        ops = sorted((e for e in events if e.key not in ("forward", "backward", "optimizer")),
                     key=lambda e: -e.self_cpu_time_total)[:top]
        out[name] = {
            "total_ms": total / 1e3,
            "phases_ms": phases,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops],
        }
    return out


# -------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--phase", type=int, choices=(1, 2), default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per repetition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default: per config)")
    ap.add_argument("--vocab", type=int, default=8192,
                    help="LLM vocabulary; 8192 keeps the LM head share of a scaled-down model closer to a 7B's "
                         "(LLaVA-1.5/Vicuna: 32000, pass it to see the full-vocabulary cost)")
    ap.add_argument("--packing", action="store_true", help="add the packed mmloom variant")
    ap.add_argument("--pad-to-msl", action="store_true", help="add mmloom with every row padded to MSL")
    ap.add_argument("--memory", action="store_true", help="peak RSS of each variant, one subprocess each")
    ap.add_argument("--profile", action="store_true", help="torch.profiler on one step of each variant")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.child_memory:
        child_memory(args)
        return 0

    names = ["hf", "mmloom-pad"]
    if args.packing:
        try:
            import mmloom.data.packing  # noqa: F401
        except ImportError:
            print("note: mmloom.data.packing is not available; --packing ignored")
        else:
            names.append("mmloom-pack")
    if args.pad_to_msl:
        names.append("mmloom-msl")
    load0 = os.getloadavg()
    cfg, n_img, runners, batches = prepare(args, names)

    # Same weights, same batch: the first losses agree (checked before any update).
    check = {}
    for n, r in runners.items():
        with torch.no_grad():
            check[n] = float(r.loss(r.batches[0]))
    for n in names:
        r = runners[n]
        r.step(r.batches[0])  # warm-up (optimizer state allocated), not timed
    pad = batches["pad"]
    lens = [int(x) for b in pad for x in b["attention_mask"].sum(1)]
    stats = {
        "samples": len(lens), "len_mean": float(np.mean(lens)), "len_median": float(np.median(lens)),
        "len_max": max(lens), "image_tokens": n_img,
        "padded_fill": sum(lens) / sum(int(b["input_ids"].numel()) for b in pad),
        "sup_per_sample": sum(b["num_loss_tokens"] for b in pad) / len(lens),
    }
    if "pack" in batches:
        pk = batches["pack"]
        stats["packed_rows_per_step"] = float(np.mean([b["num_rows"] for b in pk]))
        stats["packed_fill"] = sum(b["num_attended_tokens"] for b in pk) / sum(int(b["input_ids"].numel()) for b in pk)

    reps = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            t = runners[n].timed(args.steps)
            reps[n].append({
                "tokens_per_s": t["tokens"] / t["time"], "samples_per_s": t["samples"] / t["time"],
                "sup_tokens_per_s": t["sup"] / t["time"], "rows_tokens_per_s": t["rows_tokens"] / t["time"],
                "step_s": t["time"] / args.steps,
            })
        print(f"repetition {rep + 1}/{args.repeats}: " + ", ".join(
            f"{n} {reps[n][-1]['tokens_per_s']:,.0f} tok/s" for n in names), flush=True)
    load1 = os.getloadavg()

    def med(xs):
        return statistics.median(xs)

    summary = {}
    for n in names:
        summary[n] = {k: med([r[k] for r in reps[n]]) for k in reps[n][0]}
    ratios = {}
    for n in names[1:]:
        rs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(reps[n], reps["hf"], strict=True)]
        ratios[n] = {"median": med(rs), "min": min(rs), "max": max(rs), "all": rs}

    print(f"\nconfig {args.config}, phase {args.phase}, batch {args.batch or cfg['batch']}, vocab {args.vocab}, "
          f"MSL {cfg['msl']}, {n_img} image tokens, {args.steps} steps x {args.repeats} repetitions, "
          f"torch threads {torch.get_num_threads()}, load {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"data: sample length mean {stats['len_mean']:.0f} / median {stats['len_median']:.0f} / max "
          f"{stats['len_max']}, padded-batch fill {stats['padded_fill']:.0%}, supervised tokens/sample "
          f"{stats['sup_per_sample']:.1f}"
          + (f", packed rows/step {stats['packed_rows_per_step']:.1f} (fill {stats['packed_fill']:.0%})"
             if "packed_fill" in stats else ""))
    print(f"LM head share of LLM FLOPs per token (approx.): {lm_head_share(cfg, args.vocab, stats['len_mean']):.0%}")
    print("first-batch loss (same weights): " + ", ".join(f"{n} {v:.6f}" for n, v in check.items()))
    print("\n| variant | step s | tokens/s | samples/s | sup tok/s | rows tok/s | x hf tokens/s [min, max] |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        s = summary[n]
        ratio = "1.00" if n == "hf" else (f"{ratios[n]['median']:.2f} [{ratios[n]['min']:.2f}, "
                                          f"{ratios[n]['max']:.2f}]")
        print(f"| {n} | {s['step_s']:.3f} | {s['tokens_per_s']:,.0f} | {s['samples_per_s']:.2f} | "
              f"{s['sup_tokens_per_s']:,.0f} | {s['rows_tokens_per_s']:,.0f} | {ratio} |")

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "load": [load0, load1],
        "args": vars(args), "data": stats, "first_loss": check, "summary": summary, "ratios": ratios,
        "repetitions": reps,
    }
    if args.profile:
        result["profile"] = prof = profile(runners, args.top)
        for n, p in prof.items():
            ph = ", ".join(f"{k} {v:.0f} ms" for k, v in p["phases_ms"].items())
            print(f"\nprofile {n}: {p['total_ms']:.0f} ms ({ph})")
            for o in p["top_ops"]:
                print(f"  {o['op']:<40} {o['self_ms']:8.1f} ms {o['share']:6.1%}  x{o['calls']}")
    if args.memory:
        del runners
        gc.collect()
        result["memory"] = mem = measure_memory(args, names)
        print("\npeak memory (own subprocess each, VmHWM):")
        for n, m in mem.items():
            print(f"  {n:<12} peak {m['peak_mib']:8.0f} MiB   train delta {m['train_delta_mib']:8.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
