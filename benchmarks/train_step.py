"""Training throughput on LLaVA-shaped data: mmloom vs every transformers baseline, same weights and data.

    python benchmarks/train_step.py                      # micro-batch 16 and 4, 3 repetitions (~12 min CPU)
    python benchmarks/train_step.py --batch 16 --repeats 5 --json out.json
    python benchmarks/train_step.py --quick              # micro-batch 4, pool 32, 3 repetitions (~2-3 min)
    python benchmarks/train_step.py --smoke              # tiny shapes, seconds (tests/test_benchmarks_smoke.py)

Settings the samplers cannot deal (a pool that is not a multiple of ranks x micro-batch) are
refused in one line before anything runs.

What is measured. One process builds an mmloom CLIP + Llama + mlp2x_gelu composite (the trainer's
`builder.build_model`, feature layer -2, CLS dropped, phase 2: vision frozen, projector + LLM
train) and transformers' `LlavaForConditionalGeneration` holding a copy of the same weights. A pool
of synthetic LLaVA-shaped samples (one global batch, `--pool`, 128 as in the shipped LLaVA-1.5
configs) is cut into micro-batches by each variant's sampler, and every variant trains on the whole
pool per optimizer step (forward + backward of each micro-batch, the loss divided by the pool's
supervised-token count as the trainer does, then gradient clipping at 1.0 and AdamW). All variants
thus compute the same gradient on the same samples, and their losses are compared.

Variants (phase 2, float32, SDPA attention, no gradient checkpointing on either side):
- `hf-random`: transformers Llava, micro-batches in random order, right-padded to the longest
  sample, full-vocabulary logits loss: the HF Trainer default and the reference (1.00x);
- `hf-modality`: the same, with micro-batches from LLaVA's modality-length grouped sampler
  (`modality_length_groups` below, rewritten here: never mixes image and text-only samples);
- `hf-packed`: transformers' padding-free packing: each random micro-batch flattened into one row
  by `DataCollatorWithFlattening` (restarting `position_ids`, no attention mask). On CPU with SDPA,
  transformers itself detects the packed sequences from the position ids and builds a
  block-diagonal causal mask inside the forward (SDPA then computes the full row x row scores;
  varlen flash attention, which skips the masked blocks, needs a GPU);
- `mmloom-padded`: the trainer without a batching switch (`train_input.packing` and
  `group_by_length` off, their defaults): `TrainCollator` (rows trimmed to the longest sample),
  random order (`StepBatchSampler`), LM head and loss at supervised positions only;
- `mmloom-group`: `train_input.group_by_length` (`LengthGroupedStepSampler`: the step's samples
  sorted by length and cut into micro-batches of even padded cost, dealt evenly to the ranks);
- `mmloom-pack`: `train_input.packing`, what the shipped LLaVA-1.5 configs run (`PackedStepSampler`:
  the step's samples split over the micro-batches and ranks at even token counts;
  `PackedCollator`: one padding-free row per micro-batch with its sample boundaries; the LLM's
  attention switched to `mmloom_sdpa_varlen`: SDPA per sample, no mask).

Data (synthetic, documented): vicuna_v1-shaped conversations, token ids random. A prefix of
`image_start` tokens (BOS, system prompt, "USER:"), then 576 image slots (CLIP-L/14-336's count;
the image and vision tower here are small, see below), then turns: question log-normal (median
12, sigma 0.6) + 5 role tokens, answer log-normal (median 18, sigma 1.1) + EOS (supervised), until
the sample's text budget: log-normal, median 205 text tokens (sigma 0.7) for image samples, median
700 (sigma 0.6) for text-only ones, cut so that text + 576 slots fit MSL 2048 (the pool is the same
as in earlier runs of this script). 6% of the pool is text-only (ShareGPT's share of mix665k). The
median sample is ~780 tokens with its image slots. transformers gets each sample as LLaVA feeds
it: image samples with 576 `<image>` tokens, text-only samples without slots; mmloom gets the
HDF5 rows `mmloom data build` writes with the shipped phase-2 data config (`text_only_slots:
false`: text-only samples without slots, i.e. LLaVA's layout too; `--text-only-slots` gives them the
seed's 576 masked slots). Real tokens (the work counted in tokens/s) are the same for all:
padding, masked slots and dummy images are computed, never counted.

Timing. `torch.set_num_threads(1)` and `time.thread_time()` (this thread's CPU time: immune to
other processes on a shared machine), per micro-batch (forward + backward) plus the optimizer
step; collation is timed apart (it runs in DataLoader workers in training). Before timing, every
variant runs one micro-batch (warm-up, no update). Then `--repeats` repetitions, each one step of
every variant, the variant order rotated each repetition; ratios are taken within a repetition
and reported as median [min, max]. `8-rank est.` is the step time if the pool were spread over
8 ranks as each sampler deals it (the slowest rank's micro-batches x 8). `--compile` adds
`mmloom-pack-compiled`: `mmloom-pack` with each decoder layer's MLP compiled by `torch.compile`
(the attention stays eager; its per-sample loop would break the graph).

Shares. FLOPs per part come from `mmloom.training.metrics.FlopsEstimator` on the same samples,
for this model and, on the meta device (no weights), for LLaVA-1.5-7B (CLIP-L/336 + Vicuna-7B);
the feature-cache figure (the encoder's share of a 7B step and the cache's disk cost for 558k
images) is computed from them, not measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

# Model dims. The vision tower is small (CLIP hidden 16 x 2 layers: ~3% of this model's FLOPs, as
# CLIP-L/336 is ~1% of a 7B step) but gives LLaVA-1.5's 576 tokens: 336 px, patch 14. The decoder
# (Llama hidden 192, MLP 512, 1 layer, one attention head of width 32) is sized so that the whole
# run fits ~15 min of one CPU thread, with the LM head at a 7B-like share of the FLOPs: that share
# is about vocab / (12 x layers x hidden + vocab), so the vocabulary shrinks with the decoder (48
# here: 2-3% with full logits; LLaVA-1.5's 32000 over 32 x 4096 gives 2%). `--vocab 32000` shows
# the full-vocabulary cost on this small decoder. Attention is still a larger share than in a 7B
# (printed at start: ~8% of the FLOPs vs ~2%), and SDPA on CPU computes the full row x row square.
CONFIGS = {
    "llava": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2),
        text=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=1, num_attention_heads=1, head_dim=32,
                  num_key_value_heads=1),
        vocab=48, msl=2048, image_start=35, pool=128, batches=(16, 4), ranks=8,
        img_text=(205, 0.7), txt_text=(700, 0.6), text_only=0.06,
    ),
    "smoke": dict(
        vision=dict(image_size=56, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  num_key_value_heads=1),
        vocab=64, msl=128, image_start=6, pool=16, batches=(4,), ranks=2,
        img_text=(24, 0.5), txt_text=(40, 0.4), text_only=0.125,
    ),
}
PAD, BOS, EOS = 0, 1, 2
IGNORE = -100
VARIANTS = ("hf-random", "hf-modality", "hf-packed", "mmloom-padded", "mmloom-group", "mmloom-pack")
HF_VARIANTS = VARIANTS[:3]
COMPILED = "mmloom-pack-compiled"


# ----------------------------------------------------------------------------------- models
def model_section(cfg: dict, vocab: int):
    from mmloom.training.config import ModelSection

    text = dict(model_type="llama", vocab_size=vocab, max_position_embeddings=cfg["msl"], bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False, **cfg["text"])
    vision = dict(model_type="clip_vision_model", projection_dim=cfg["vision"]["hidden_size"], **cfg["vision"])
    return ModelSection(image_model=vision, text_model=text, projector="mlp2x_gelu", freeze=["^image_model"],
                        image_feature_select_layer_idx=-2, image_feature_select_mode="patch",
                        image_token_id=vocab - 1, pad_token_id=PAD, attn_implementation="sdpa")


def llava_like(model, image_token_id: int):
    """A transformers Llava holding a copy of the weights of an mmloom CLIP + Llama + mlp2x_gelu
    composite (feature layer -2, CLS dropped): the mapping of `mmloom.interop.hf_llava`, copied
    (not shared) so that both models train independently."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mmloom.interop.common import vision_parts

    parts = vision_parts(model, "hf-llava")
    assert parts.depth == 2 and parts.layer == -2 and parts.drops_cls
    llm = parts.language_model
    config = LlavaConfig(
        vision_config=parts.tower.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=image_token_id, image_seq_length=model.num_feature_tokens("vision"),
        projector_hidden_act=parts.activation, vision_feature_layer=parts.layer,
        vision_feature_select_strategy="default", multimodal_projector_bias=parts.bias, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower.load_state_dict(parts.tower.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(parts.projection[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(parts.projection[2].state_dict())
    hf.model.language_model.load_state_dict(llm.model.state_dict())
    hf.lm_head.load_state_dict(llm.lm_head.state_dict())
    # phase 2: the vision tower frozen, projector + LLM train (mmloom: freeze ["^image_model"])
    hf.train()
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    hf.model.vision_tower.eval()
    return hf


def build_models(cfg: dict, vocab: int, seed: int = 0):
    from mmloom.training import builder

    section = model_section(cfg, vocab)
    model = builder.build_model(section, seed=seed)
    model.freeze(section.freeze)
    model.train()
    return model, llava_like(model, section.image_token_id)


# ------------------------------------------------------------------------------------- data
def lognormal(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), lo, hi))


def make_pool(cfg: dict, n_img: int, vocab: int, seed: int = 1) -> list[dict]:
    """The pool's samples as token lists: `ids` (the HDF5 layout: `image_start` prefix tokens,
    `n_img` slots, text), `sup` (per token: supervised), `has_image`; see the module docstring."""
    rng = np.random.default_rng(seed)
    msl, start, pool = cfg["msl"], cfg["image_start"], cfg["pool"]
    n_text_only = int(round(pool * cfg["text_only"]))
    text_only = set(rng.choice(pool, n_text_only, replace=False).tolist())
    image_token = vocab - 1
    samples = []
    for i in range(pool):
        has_image = i not in text_only
        median, sigma = cfg["img_text"] if has_image else cfg["txt_text"]
        budget = lognormal(rng, median, sigma, start + 8, msl - n_img)  # text tokens, slots excluded
        ids = [BOS, *rng.integers(3, image_token, size=start - 1).tolist(), *([PAD] * n_img)]
        sup = [False] * len(ids)
        while len(ids) - n_img < budget:
            q = lognormal(rng, 12, 0.6, 2, 200) + 5  # + "\n"/"USER:"/"ASSISTANT:" role tokens
            a = lognormal(rng, 18, 1.1, 1, 600)
            ids += rng.integers(3, image_token, size=q).tolist()
            sup += [False] * q
            ids += [*rng.integers(3, image_token, size=a).tolist(), EOS]
            sup += [True] * (a + 1)
        cut = max(budget + n_img, sup.index(True) + 1)  # every sample keeps at least one answer token
        samples.append({"ids": ids[:cut], "sup": sup[:cut], "has_image": has_image, "index": i})
    return samples


def hdf5_item(s: dict, cfg: dict, n_img: int, image: torch.Tensor, slots: bool = False) -> dict:
    """What `HDF5LlavaDataset` yields for sample `s`: ids padded to MSL, key_padding_mask,
    loss_mask[t] = token t + 1 is supervised, the image. Text-only samples have no slots
    (`text_only_slots: false`, the shipped phase-2 data) or, with `slots`, the seed's masked ones."""
    msl, start = cfg["msl"], cfg["image_start"]
    ids, sup = list(s["ids"]), list(s["sup"])
    drop = not s["has_image"] and not slots
    if drop:
        del ids[start : start + n_img], sup[start : start + n_img]
    n = len(ids)
    text_ids = torch.full((msl,), PAD, dtype=torch.int32)
    text_ids[:n] = torch.tensor(ids, dtype=torch.int32)
    kpm = torch.ones(msl, dtype=torch.int32)
    kpm[:n] = 0
    if not s["has_image"] and not drop:
        kpm[start : start + n_img] = 1
    loss_mask = torch.zeros(msl, dtype=torch.int32)
    loss_mask[: n - 1] = torch.tensor(sup[1:], dtype=torch.int32)
    return {"text_input_ids": text_ids, "key_padding_mask": kpm, "loss_mask": loss_mask,
            "has_image": s["has_image"], "image_data": image if s["has_image"] else torch.zeros_like(image),
            "image_start_idx": -1 if drop else start, "index": s["index"]}


def hf_item(s: dict, cfg: dict, n_img: int, image_token: int) -> dict:
    """The same sample as LLaVA feeds transformers: image samples with `n_img` image tokens,
    text-only samples without slots; labels unshifted, -100 where not supervised."""
    start = cfg["image_start"]
    ids, sup = list(s["ids"]), list(s["sup"])
    if s["has_image"]:
        ids[start : start + n_img] = [image_token] * n_img
    else:
        del ids[start : start + n_img], sup[start : start + n_img]
    return {"input_ids": ids, "labels": [t if k else IGNORE for t, k in zip(ids, sup, strict=True)]}


def sample_length(s: dict, n_img: int) -> int:
    """Real tokens of a sample (the masked slots of a text-only one excluded)."""
    return len(s["ids"]) - (0 if s["has_image"] else n_img)


# --------------------------------------------------------------------------------- samplers
def modality_length_groups(lengths, has_image, micro: int, global_batch: int, seed: int) -> list[list[int]]:
    """LLaVA's modality-length grouping (`group_by_modality_length`), in our own words.

    Image and text-only samples are kept apart: each modality's samples are shuffled and cut into
    mega-batches of one global batch; each mega-batch is sorted by length, longest first, and dealt
    into ceil(n / micro) micro-batches of as even a sample count as possible by always giving the next
    sample to the micro-batch with the smallest total length that still has room (so every rank gets
    about the same work: each micro-batch spans the mega-batch's range of lengths); the
    mega-batches are then shuffled. A modality's last micro-batch may be short here (LLaVA merges
    the last, partial mega-batches of both modalities into one mixed mega-batch at the epoch's end).
    Lengths are token counts (LLaVA estimates them from word counts). Returns micro-batches of
    indices, in order.
    """
    rng = np.random.default_rng(seed)
    megas = []
    for modality in (True, False):
        idx = [i for i in range(len(lengths)) if bool(has_image[i]) == modality]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        for a in range(0, len(idx), global_batch):
            mega = sorted(idx[a : a + global_batch], key=lambda i: -lengths[i])
            chunks = [[] for _ in range(-(-len(mega) // micro))]
            room = -(-len(mega) // len(chunks))  # as even as the count allows
            totals = [0] * len(chunks)
            for i in mega:
                open_ = [c for c in range(len(chunks)) if len(chunks[c]) < room]
                c = min(open_, key=lambda c: (totals[c], c))
                chunks[c].append(i)
                totals[c] += lengths[i]
            megas.append(chunks)
    order = rng.permutation(len(megas))
    return [chunk for k in order for chunk in megas[k]]


def schedules(samples: list[dict], n_img: int, micro: int, ranks: int, seed: int, msl: int, slots: bool) -> dict:
    """Micro-batches (sample indices) and the rank each runs on, per sampler."""
    from mmloom.data.sampling import LengthGroupedStepSampler, PackedStepSampler, StepBatchSampler

    n = len(samples)
    real = [sample_length(s, n_img) for s in samples]
    # the HDF5 row's last attended position + 1 (a text-only row keeps its masked slots with `slots`)
    last = [len(s["ids"]) if (s["has_image"] or slots) else real[i] for i, s in enumerate(samples)]
    args = dict(n=n, global_batch=n, world_size=ranks, micro_batch=micro, seed=seed, shuffle=True, start_step=0,
                total_steps=1)
    out = {}
    for name, make in (("random", lambda r: StepBatchSampler(rank=r, **args)),
                       ("mmloom-group", lambda r: LengthGroupedStepSampler(last, rank=r, **args)),
                       ("mmloom-pack", lambda r: PackedStepSampler(real, msl, rank=r, **args))):
        out[name] = [(list(mb), r) for r in range(ranks) for mb in make(r)]
    groups = modality_length_groups(real, [s["has_image"] for s in samples], micro, n, seed)
    out["llava"] = [(mb, k % ranks) for k, mb in enumerate(groups)]  # accelerate deals batches round-robin
    return out


# --------------------------------------------------------------------------------- batches
def hf_padded(items: list[dict], images: list) -> dict:
    width = max(len(it["input_ids"]) for it in items)
    B = len(items)
    input_ids = torch.full((B, width), PAD, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack(images) if images else None}


def hf_flattened(items: list[dict], images: list) -> dict:
    from transformers import DataCollatorWithFlattening

    out = DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
    return {"input_ids": out["input_ids"], "labels": out["labels"], "position_ids": out["position_ids"],
            "attention_mask": None, "pixel_values": torch.stack(images) if images else None}


def batch_stats(variant: str, b: dict) -> dict:
    """Real tokens, computed positions, attention scores computed (the (query, key) squares SDPA is
    handed: rows x width^2 for padded rows under a mask, the flattened row's square for hf-packed,
    each segment's square for mmloom's packed rows; the kernels' skipping of blocks above a causal
    diagonal is not counted for anyone), real causal pairs, supervised positions."""
    from mmloom.training.metrics import batch_work

    if variant.startswith("hf"):
        if b["attention_mask"] is not None:
            lengths = b["attention_mask"].sum(1).tolist()
        else:  # one flattened row: sequences restart their position ids
            pos = b["position_ids"][0]
            starts = [0, *(torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist(), pos.numel()]
            lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        real = int(sum(lengths))
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        sup = int((b["labels"][:, 1:] != IGNORE).sum())
    else:
        work = batch_work(b)
        real, pairs, sup = work.tokens, work.attention_pairs, work.head_positions
    rows, width = b["input_ids"].shape
    if b.get("cu_seq_lens_q") is not None:  # per-segment attention, no mask
        cu = b["cu_seq_lens_q"].tolist()
        dense = sum((e - a) ** 2 for a, e in zip(cu[:-1], cu[1:], strict=True))
    else:
        dense = rows * width * width
    return {"real": real, "computed": rows * width, "attn_dense": dense, "attn_real": pairs, "sup": sup}


def build_batches(samples, cfg, n_img, vocab, images, micro: int, seed: int, slots: bool = False,
                  compiled: bool = False) -> tuple[dict, dict]:
    """Per variant: the list of (batch, rank), and the thread CPU seconds its collation took."""
    from mmloom.data.collate import PackedCollator, TrainCollator

    image_token = vocab - 1
    sched = schedules(samples, n_img, micro, cfg["ranks"], seed, cfg["msl"], slots)
    h5 = [hdf5_item(s, cfg, n_img, images[i], slots) for i, s in enumerate(samples)]
    hf = [hf_item(s, cfg, n_img, image_token) for s in samples]
    pad = TrainCollator(image_token, PAD, n_img, trim=True)
    pack = PackedCollator(TrainCollator(image_token, PAD, n_img))

    def hf_images(mb):
        return [images[i] for i in mb if samples[i]["has_image"]]

    recipes = {
        "hf-random": ("random", lambda mb: hf_padded([hf[i] for i in mb], hf_images(mb))),
        "hf-modality": ("llava", lambda mb: hf_padded([hf[i] for i in mb], hf_images(mb))),
        "hf-packed": ("random", lambda mb: hf_flattened([hf[i] for i in mb], hf_images(mb))),
        "mmloom-padded": ("random", lambda mb: pad([h5[i] for i in mb])),
        "mmloom-group": ("mmloom-group", lambda mb: pad([h5[i] for i in mb])),
        "mmloom-pack": ("mmloom-pack", lambda mb: pack([h5[i] for i in mb])),
    }
    batches, collate_s = {}, {}
    for name, (sampler, collate) in recipes.items():
        t0 = time.thread_time()
        batches[name] = [(collate(mb), rank) for mb, rank in sched[sampler]]
        collate_s[name] = time.thread_time() - t0
    if compiled:
        batches[COMPILED], collate_s[COMPILED] = batches["mmloom-pack"], collate_s["mmloom-pack"]
    return batches, collate_s


# ---------------------------------------------------------------------------------- training
class Runner:
    """One variant: its own copy of the weights and AdamW; `step()` = one optimizer step on the pool."""

    def __init__(self, name: str, model, batches: list, lr: float = 1e-4):
        self.name, self.model, self.batches = name, model, batches
        self.hf = name in HF_VARIANTS
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.denominator = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b, _ in batches)))

    def loss(self, b: dict) -> torch.Tensor:
        """Sum of this micro-batch's token losses / the pool's supervised tokens."""
        if self.hf:
            extra = {"position_ids": b["position_ids"]} if b.get("position_ids") is not None else {}
            # use_cache=False as LLaVA's train.py sets it: with a cache, transformers 5 skips the packed-
            # sequence detection and the flattened rows attend across samples
            return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                              pixel_values=b["pixel_values"], num_items_in_batch=self.denominator, use_cache=False,
                              **extra).loss
        from mmloom.model.batch import model_inputs

        return self.model(**model_inputs(b), labels=b["labels"], num_items_in_batch=self.denominator,
                          compute_logits=False).loss

    def warm_up(self) -> None:
        self.loss(self.batches[0][0]).backward()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> dict:
        times, total = [], 0.0
        for b, _rank in self.batches:
            t0 = time.thread_time()
            loss = self.loss(b)
            loss.backward()
            times.append(time.thread_time() - t0)
            total += float(loss.detach())
        t0 = time.thread_time()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        opt_s = time.thread_time() - t0
        return {"loss": total, "micro_s": times, "opt_s": opt_s, "step_s": sum(times) + opt_s}

    @torch.no_grad()
    def eval_loss(self, batches: list) -> float:
        was = self.model.training
        self.model.eval()
        try:
            return sum(float(self.loss(b)) for b, _ in batches)
        finally:
            self.model.train(was)


def ranked_step_s(rec: dict, batches: list, ranks: int) -> float:
    """Step time with the micro-batches spread over `ranks` as the sampler deals them: the slowest
    rank's compute x `ranks` (device-seconds), + the optimizer step."""
    per_rank = [0.0] * ranks
    for (_b, rank), t in zip(batches, rec["micro_s"], strict=True):
        per_rank[rank] += t
    return max(per_rank) * ranks + rec["opt_s"]


# ------------------------------------------------------------------------------------ shares
def llava_7b_estimator(phase: int = 2, vocab: int = 32000):
    """FlopsEstimator of LLaVA-1.5-7B (CLIP-L/14-336 + Vicuna-7B, mlp2x_gelu), built on the meta
    device (shapes only, no memory), phase 2: vision frozen; phase 1: only the projector trains."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
    from mmloom.training.metrics import FlopsEstimator

    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                                                intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16))
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                           tie_word_embeddings=False))
        m = MultimodalModel({"vision": ModalEncoderModule(clip, postprocess_module_callback=FeatureSelect(-2, "patch"))},
                            llm, init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": vocab})
    m.freeze(["^image_model"] if phase == 2 else ["^image_model", "^text_model"])
    return FlopsEstimator(m, image_positions=577, feature_tokens=576)


def pool_work(samples: list[dict], n_img: int, supervised_only: bool):
    """The pool's `StepWork` when each sample runs alone (per-sample causal attention, no padding),
    dummy images of text-only samples included (mmloom's default)."""
    from mmloom.training.metrics import StepWork

    work = StepWork()
    for s in samples:
        n = sample_length(s, n_img)
        work = work + StepWork(tokens=n, attention_pairs=n * (n + 1) // 2,
                               head_positions=sum(s["sup"][1:]) if supervised_only else n,
                               encoder_images=1, projected_images=1)
    return work


def shares(est, work) -> dict:
    parts = est.parts(work)
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def feature_cache_figure(samples, n_img: int) -> dict:
    """LLaVA-7B: the vision encoder's share of a training step's FLOPs (what a feature cache
    saves in compute) and the cache's disk size for LCS-558K, computed."""
    images = 558_128  # LLaVA-Pretrain LCS-558K
    disk = images * 576 * 1024 * 2  # float16 features of layer -2, CLS dropped
    # phase 1 ("plain" captions): BOS + 576 slots + a ~15-token caption + EOS, caption supervised
    from mmloom.training.metrics import StepWork

    n = 1 + 576 + 16
    p1 = StepWork(tokens=n, attention_pairs=n * (n + 1) // 2, head_positions=16, encoder_images=1, projected_images=1)
    return {
        "phase1_vision_share": shares(llava_7b_estimator(phase=1), p1)["vision"],
        "phase2_vision_share": shares(llava_7b_estimator(phase=2), pool_work(samples, n_img, True))["vision"],
        "images": images, "disk_bytes": disk,
    }


# -------------------------------------------------------------------------------------- run
def compile_mlps(model) -> None:
    """`torch.compile` each decoder layer's MLP (in place): the fusable part of the decoder; the
    per-sample attention stays eager."""
    for layer in model.language_model.model.layers:
        layer.mlp.compile(dynamic=True)


def make_runner(name: str, models, batches) -> Runner:
    from mmloom.model.attention import use_packed_attention

    mm, hf = models
    model = copy.deepcopy(hf if name in HF_VARIANTS else mm)
    if name in ("mmloom-pack", COMPILED):
        use_packed_attention(model.language_model)  # what the trainer does with train_input.packing
    if name == COMPILED:
        compile_mlps(model)
    return Runner(name, model, batches)


def run_batch_size(args, cfg, models, samples, images, n_img, micro: int) -> dict:
    vocab = args.vocab or cfg["vocab"]
    names = [*VARIANTS, *([COMPILED] if args.compile else [])]
    opts = dict(slots=args.text_only_slots, compiled=args.compile)
    batches, collate_s = build_batches(samples, cfg, n_img, vocab, images, micro, args.seed, **opts)
    stats = {}
    for name, bs in batches.items():
        st = [batch_stats(name, b) for b, _ in bs]
        stats[name] = {k: sum(x[k] for x in st) for k in st[0]}
        stats[name]["micro_batches"] = len(bs)
    reals = {n: s["real"] for n, s in stats.items()}
    sups = {n: s["sup"] for n, s in stats.items()}
    assert len(set(reals.values())) == 1, f"real tokens differ between variants: {reals}"
    assert len(set(sups.values())) == 1, f"supervised tokens differ between variants: {sups}"

    runners = {name: make_runner(name, models, batches[name]) for name in names}

    # Same weights, same samples: losses on the image samples agree across all variants (and on the
    # whole pool, see the first step's losses, unless --text-only-slots shifts the positions of the
    # text-only samples' tokens after their masked slots).
    images_in_pool = [s for s in samples if s["has_image"]]
    img_only = images_in_pool[: micro * max(1, min(len(images_in_pool), max(2 * micro, 4)) // micro)]
    keep = {s["index"] for s in img_only}
    sub_samples = [s for s in samples if s["index"] in keep]
    sub_images = [images[s["index"]] for s in sub_samples]
    sub, _ = build_batches(sub_samples, {**cfg, "ranks": 1}, n_img, vocab, sub_images, micro, args.seed, **opts)
    check = {}
    for name, r in runners.items():
        saved = r.denominator
        r.denominator = torch.tensor(float(sum(batch_stats(name, b)["sup"] for b, _ in sub[name])))
        check[name] = r.eval_loss(sub[name])  # mean token loss over the subset's supervised tokens
        r.denominator = saved
    warm = {}
    for name, r in runners.items():
        t0 = time.thread_time()
        r.warm_up()
        warm[name] = time.thread_time() - t0

    reps = {n: [] for n in names}
    for rep in range(args.repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            rec = runners[name].step()
            rec["ranked_s"] = ranked_step_s(rec, batches[name], cfg["ranks"])
            reps[name].append(rec)
        print(f"  micro-batch {micro}, repetition {rep + 1}/{args.repeats}: "
              + ", ".join(f"{n} {reps[n][-1]['step_s']:.2f}s" for n in names), flush=True)
    return summarise(reps, stats, collate_s, check, warm)


def summarise(reps: dict, stats: dict, collate_s: dict, check: dict, warm: dict) -> dict:
    real = next(iter(stats.values()))["real"]
    # the best transformers baseline: the highest median per-repetition speed ratio to hf-random
    best_hf = max(HF_VARIANTS, key=lambda n: statistics.median(
        a["step_s"] / b["step_s"] for a, b in zip(reps["hf-random"], reps[n], strict=True)))
    out = {"best_hf": best_hf, "variants": {}}
    for name in reps:
        rs = reps[name]
        step = [r["step_s"] for r in rs]

        def ratio(base, key="step_s", rs=rs):
            xs = [b[key] / a[key] for a, b in zip(rs, reps[base], strict=True)]
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

        st = stats[name]
        out["variants"][name] = {
            "step_s": {"median": statistics.median(step), "min": min(step), "max": max(step), "all": step},
            "tokens_per_s": real / statistics.median(step),
            "vs_reference": ratio("hf-random"), "vs_best_hf": ratio(best_hf),
            "ranked_vs_reference": ratio("hf-random", "ranked_s"),
            "real_over_computed": st["real"] / st["computed"],
            "attention_real_over_dense": st["attn_real"] / st["attn_dense"],
            "micro_batches": st["micro_batches"], "computed_positions": st["computed"],
            "collate_s": collate_s[name], "losses": [r["loss"] for r in rs], "image_only_loss": check[name],
            "warm_up_s": warm[name],
        }
    out["real_tokens"] = real
    out["supervised_tokens"] = next(iter(stats.values()))["sup"]
    return out


def print_table(micro: int, res: dict) -> None:
    best = res["best_hf"]
    print(f"\nmicro-batch {micro}: {res['real_tokens']:,} real tokens per step; best transformers baseline: {best}")
    print("| variant | real / computed positions | real / computed attention scores | step s (thread CPU) [min, max] "
          f"| tokens/s | vs hf-random [min, max] | vs {best} [min, max] | 8-rank est. vs hf-random | collate s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in res["variants"].items():
        s, a, b, c = v["step_s"], v["vs_reference"], v["vs_best_hf"], v["ranked_vs_reference"]
        print(f"| {name} | {v['real_over_computed']:.0%} | {v['attention_real_over_dense']:.0%} | {s['median']:.2f} "
              f"[{s['min']:.2f}, {s['max']:.2f}] | {v['tokens_per_s']:,.0f} | {a['median']:.2f}x [{a['min']:.2f}, "
              f"{a['max']:.2f}] | {b['median']:.2f}x [{b['min']:.2f}, {b['max']:.2f}] | {c['median']:.2f}x "
              f"| {v['collate_s']:.2f} |")
    losses = {n: v["losses"] for n, v in res["variants"].items()}
    img = {n: v["image_only_loss"] for n, v in res["variants"].items()}
    spread = max(img.values()) - min(img.values())
    print(f"image-sample loss, same weights (all variants): {min(img.values()):.6f} .. {max(img.values()):.6f} "
          f"(spread {spread:.1e})")
    for fam, names in (("transformers", HF_VARIANTS), ("mmloom", [n for n in losses if n not in HF_VARIANTS])):
        first = [losses[n][0] for n in names]
        print(f"first-step loss, whole pool, {fam}: {min(first):.6f} .. {max(first):.6f}")
    if COMPILED in res["variants"]:
        w = {n: res["variants"][n]["warm_up_s"] for n in ("mmloom-pack", COMPILED)}
        print(f"warm-up micro-batch (compilation included): mmloom-pack {w['mmloom-pack']:.1f}s, "
              f"{COMPILED} {w[COMPILED]:.1f}s")


QUICK = dict(pool=32, batches=(4,), repeats=3)  # --quick: one micro-batch size, a quarter of the pool


def check_args(args, cfg: dict) -> str | None:
    """Why the settings cannot run (one line), or None. Every variant deals the pool to `ranks`
    ranks of whole micro-batches (the trainer's rule: batch_size = ranks x micro-batch x
    accumulation), and the loss check takes whole micro-batches of image samples."""
    for name, value in (("--repeats", args.repeats), ("--pool", cfg["pool"])):
        if value is not None and value < 1:
            return f"{name} must be at least 1, got {value}"
    if args.vocab is not None and args.vocab < 8:
        return f"--vocab {args.vocab} leaves no room for the special and image tokens: give at least 8"
    pool, ranks = cfg["pool"], cfg["ranks"]
    images = pool - int(round(pool * cfg["text_only"]))
    for micro in cfg["batches"]:
        if micro < 1:
            return f"--batch must be at least 1, got {micro}"
        if pool % (ranks * micro):
            fits = ranks * micro
            return (f"--pool {pool} cannot be dealt to {ranks} ranks x micro-batch {micro} (the {ranks}-rank estimate): "
                    f"use a multiple of {fits} (e.g. --pool {max(fits, pool // fits * fits)}) or a micro-batch that "
                    f"divides {pool // ranks}" + ("" if pool % ranks == 0 else f" (--pool a multiple of {ranks})"))
        if images < micro:
            return f"--pool {pool} has {images} image samples, fewer than one micro-batch of {micro} for the loss check"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition: checks that the script runs")
    ap.add_argument("--quick", action="store_true",
                    help=f"the same table from micro-batch {QUICK['batches'][0]}, a pool of {QUICK['pool']} and "
                    f"{QUICK['repeats']} repetitions (a few minutes on 2 cores; noisier)")
    ap.add_argument("--batch", type=int, action="append", default=None,
                    help="micro-batch size (repeatable; default: 16 and 4)")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; smoke 1)")
    ap.add_argument("--pool", type=int, default=None, help="samples per step (one global batch; default 128)")
    ap.add_argument("--vocab", type=int, default=None, help="LLM vocabulary (default: a 7B-like LM-head share)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--text-only-slots", action="store_true",
                    help="mmloom's text-only samples keep the seed's 576 masked slots (text_only_slots: true)")
    ap.add_argument("--compile", action="store_true",
                    help=f"add {COMPILED}: mmloom-pack with torch.compile'd decoder MLPs")
    args = ap.parse_args(argv)
    if args.smoke and args.quick:
        print("train_step.py: error: --smoke and --quick exclude each other", file=sys.stderr)
        return 2
    cfg = copy.deepcopy(CONFIGS["smoke" if args.smoke else "llava"])
    if args.quick:
        cfg.update(pool=QUICK["pool"], batches=QUICK["batches"])
    if args.pool is not None:
        cfg["pool"] = args.pool
    if args.batch:
        cfg["batches"] = tuple(args.batch)
    problem = check_args(args, cfg)
    if problem:
        print(f"train_step.py: error: {problem}", file=sys.stderr)
        return 2
    args.repeats = args.repeats or (1 if args.smoke else QUICK["repeats"] if args.quick else 3)
    micro_sizes = list(cfg["batches"])
    vocab = args.vocab or cfg["vocab"]
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    load0 = os.getloadavg()
    t_start = time.time()
    mm, hf = build_models(cfg, vocab)
    n_img = mm.num_feature_tokens("vision")
    samples = make_pool(cfg, n_img, vocab, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    size = cfg["vision"]["image_size"]
    images = [torch.randn(3, size, size, generator=gen) for _ in samples]

    from mmloom.training.metrics import FlopsEstimator

    lengths = [len(s["ids"]) - (0 if s["has_image"] else n_img) for s in samples]
    with_slots = [len(s["ids"]) for s in samples]
    est = FlopsEstimator(mm, image_positions=(size // cfg["vision"]["patch_size"]) ** 2 + 1, feature_tokens=n_img)
    data = {
        "samples": len(samples), "text_only": sum(not s["has_image"] for s in samples), "image_tokens": n_img,
        "median_tokens_with_slots": float(np.median([n if s["has_image"] else n - n_img
                                                     for n, s in zip(with_slots, samples, strict=True)])),
        "mean_real_tokens": float(np.mean(lengths)), "max_tokens_with_slots": max(with_slots),
        "supervised_share": sum(sum(s["sup"][1:]) for s in samples) / sum(lengths),
    }
    flop_shares = {
        "this_model_full_logits": shares(est, pool_work(samples, n_img, False)),
        "this_model_supervised_only": shares(est, pool_work(samples, n_img, True)),
    }
    if not args.smoke:
        flop_shares["llava_7b_full_logits"] = shares(llava_7b_estimator(), pool_work(samples, n_img, False))
        flop_shares["llava_7b_supervised_only"] = shares(llava_7b_estimator(), pool_work(samples, n_img, True))
    print(f"model: CLIP {size}px/{cfg['vision']['patch_size']} ({n_img} image tokens) hidden "
          f"{cfg['vision']['hidden_size']} x {cfg['vision']['num_hidden_layers']}; Llama hidden "
          f"{cfg['text']['hidden_size']} x {cfg['text']['num_hidden_layers']} layers, attention width "
          f"{cfg['text']['num_attention_heads'] * cfg['text']['head_dim']}, vocab {vocab}; MSL {cfg['msl']}")
    print(f"data: {data['samples']} samples ({data['text_only']} text-only), median "
          f"{data['median_tokens_with_slots']:.0f} tokens incl. image slots (text-only: without), mean real "
          f"{data['mean_real_tokens']:.0f}, supervised {data['supervised_share']:.0%} of real tokens")
    for k, v in flop_shares.items():
        print(f"FLOPs shares, {k}: " + ", ".join(f"{p} {x:.1%}" for p, x in v.items()))

    results = {}
    for micro in micro_sizes:
        results[micro] = run_batch_size(args, cfg, (mm, hf), samples, images, n_img, micro)
        print_table(micro, results[micro])
    fc = None if args.smoke else feature_cache_figure(samples, n_img)
    if fc:
        print(f"\nfeature cache, LLaVA-7B (computed): CLIP-L/336 is {fc['phase1_vision_share']:.1%} of a phase-1 "
              f"step's FLOPs and {fc['phase2_vision_share']:.1%} of a phase-2 step's; {fc['images']:,} images x 576 "
              f"x 1024 float16 = {fc['disk_bytes'] / 1e9:.0f} GB ({fc['disk_bytes'] / 2**30:.0f} GiB)")
    load1 = os.getloadavg()
    print(f"\nwall {time.time() - t_start:.0f} s, load {load0[0]:.1f} -> {load1[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}")
    if args.json:
        out = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args),
            "config": cfg, "vocab": vocab, "data": data, "flop_shares": flop_shares, "feature_cache": fc,
            "results": {str(k): v for k, v in results.items()}, "load": [load0, load1],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
