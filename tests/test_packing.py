"""Sequence packing and length grouping: packed rows computed per sample (exact parity with
unpacked batches: per-sample losses, gradients, trainer losses; no attention across samples, no
(T, T) mask), the boundaries the flash varlen path gets, the step-level micro-batch algorithms,
the samplers' balance and exact resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from helpers import IMAGE_ID, vlm
from mmloom.cli.main import main
from mmloom.data.collate import PackedCollator, TrainCollator
from mmloom.data.packing import balance_tokens, deal_to_ranks, group_by_cost
from mmloom.data.sampling import (
    PAD_INDEX,
    LengthGroupedStepSampler,
    PackedStepSampler,
    StepBatchSampler,
    sample_lengths,
)
from mmloom.errors import MmloomError
from mmloom.model import attention
from mmloom.model.attention import VARLEN_ATTENTION, use_packed_attention
from mmloom.model.batch import model_inputs

PAD, N_IMG, MSL = 3, 16, 64
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def make_item(prefix: int, answer: int, has_image: bool, seed: int, msl: int = MSL, slots: bool = True) -> dict:
    """A HDF5LlavaDataset-like item: BOS, prompt, 16 slots (masked for text-only ones in the seed's
    layout; none at all with `slots=False`, LLaVA's layout), supervised answer."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(10, 390, (n,), generator=g).tolist()  # noqa: E731
    n_slots = N_IMG if (has_image or slots) else 0
    ids = [0, *words(prefix), *([PAD] * n_slots), *words(3), *words(answer)]
    n = len(ids)
    s = 1 + prefix
    kpm = [0] * n + [1] * (msl - n)
    loss = [0] * msl
    for t in range(n - answer - 1, n - 1):  # loss_mask[t] = 1: token t+1 is supervised
        loss[t] = 1
    if not has_image:
        kpm[s : s + n_slots] = [1] * n_slots
    image = torch.rand(3, 32, 32, generator=g) if has_image else torch.zeros(3, 32, 32)
    return {
        "text_input_ids": torch.tensor(ids + [PAD] * (msl - n), dtype=torch.int32),
        "loss_mask": torch.tensor(loss, dtype=torch.int32),
        "key_padding_mask": torch.tensor(kpm, dtype=torch.int32),
        "labels": torch.zeros(msl, dtype=torch.int32),
        "image_data": image,
        "has_image": has_image,
        "image_start_idx": s if n_slots else -1,
        "index": seed,
    }


def items_mixed() -> list[dict]:
    """Image samples, text-only samples with masked slots (seed layout) and without (LLaVA layout)."""
    spec = [(3, 9, True, True), (10, 20, False, True), (2, 4, True, True), (5, 30, True, True),
            (1, 2, False, True), (4, 12, True, True), (6, 25, False, False)]
    return [make_item(p, a, h, seed=i, slots=sl) for i, (p, a, h, sl) in enumerate(spec)]


def row_spans(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sample of a padded batch."""
    return [(i, 0, int(batch["attention_mask"][i].nonzero().max()) + 1) for i in range(batch["input_ids"].shape[0])]


def sample_loss_sums(logits: torch.Tensor, labels: torch.Tensor, spans) -> list[float]:
    out = []
    for r, a, b in spans:
        lg, lb = logits[r, a : b - 1], labels[r, a + 1 : b]
        keep = lb != -100
        out.append(float(F.cross_entropy(lg[keep].double(), lb[keep], reduction="sum")))
    return out


def run(model, batch, **kw):
    return model(**model_inputs(batch), labels=batch["labels"], **kw)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fast_loss_and_grads(model, batch, denominator: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of `batch` through the supervised-only path (divided by `denominator`) and the gradients it gives."""
    model.zero_grad()
    loss = run(model, batch, compute_logits=False, num_items_in_batch=denominator).loss
    loss.backward()
    return loss, grads(model)


class SegmentCalls:
    """Records the query length and window of every per-segment attention of the varlen path."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = attention._segment_attention

        def spy(q, k, v, scaling, dropout, window):
            self.calls.append((q.shape[2], window))
            return real(q, k, v, scaling, dropout, window)

        monkeypatch.setattr(attention, "_segment_attention", spy)


# ----------------------------------------------------------------------- (a) exact parity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(attn, monkeypatch):
    """A packed row (one row, no padding, no mask) computes what the padded batch computes, per
    sample; its attention runs per sample (causal SDPA calls no longer than a sample, no mask)."""
    torch.set_num_threads(1)
    model = vlm(attn_implementation=attn).float()
    items = items_mixed()
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    plain = collator(items)
    packed = PackedCollator(collator)(items)
    assert packed["attention_mask"] is None and packed["input_ids"].shape == (1, packed["num_attended_tokens"])
    assert packed["num_loss_tokens"] == plain["num_loss_tokens"]
    assert packed["num_attended_tokens"] == plain["num_attended_tokens"]
    assert packed["vision"]["pixel_values"].shape[0] == 4  # the real images only (no dummies needed)
    with pytest.raises(MmloomError, match="needs the language model's attention to take packed rows"):
        run(model, packed)
    assert use_packed_attention(model.language_model) == VARLEN_ATTENTION

    # per-sample losses from full logits
    calls = SegmentCalls(monkeypatch)
    with torch.no_grad():
        lp = run(model, plain).logits
        assert not calls.calls  # unpacked batches: transformers' sdpa path, as before the switch
        lk = run(model, packed).logits
    longest = max(b - a for _, a, b in packed["spans"])
    assert calls.calls and all(n <= longest and window is None for n, window in calls.calls)
    assert len(calls.calls) == 2 * len(items)  # 2 layers x one call per sample
    a = sample_loss_sums(lp, plain["labels"], row_spans(plain))
    b = sample_loss_sums(lk, packed["labels"], packed["spans"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # total loss and gradients through the fast (supervised-only) path
    denom = torch.tensor(float(plain["num_loss_tokens"]))
    loss_a, ga = fast_loss_and_grads(model, plain, denom)
    loss_b, gb = fast_loss_and_grads(model, packed, denom)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert abs(loss_a.item() - sum(a) / float(denom)) < 1e-4
    assert set(ga) == set(gb) and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_with_gradient_checkpointing_and_cached_features():
    """Recomputed layers (gradient checkpointing) get the same boundaries: same loss and gradients;
    packed batches of cached encoder features carry the features, dummy included."""
    from mmloom.data.collate import FeatureCollator

    torch.set_num_threads(1)
    model = vlm().float()
    use_packed_attention(model.language_model)
    items = items_mixed()
    packed = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG))(items)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        loss = run(model, packed, compute_logits=False).loss
        loss.backward()
        results.append((loss.item(), grads(model)))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)
    cached = [{**it, "module_features": torch.full((N_IMG, 32), float(it["has_image"]))} for it in items[4:]]
    for it in cached:
        del it["image_data"]
    batch = FeatureCollator(PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG)))(cached)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    assert batch["vision"]["module_features"].shape == (1, N_IMG, 32) and "pixel_values" not in batch["vision"]
    only_text = FeatureCollator(PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG)))([cached[0], cached[2]])
    assert only_text["vision"]["module_features"].shape == (1, N_IMG, 32) and not only_text["vision"]["module_features"].any()


def test_varlen_attention_sliding_window_gqa_and_unpacked_batches():
    """Mistral (GQA, sliding window 5): packed samples longer than the window compute what
    transformers' sdpa computes for each sample alone; padded batches and generation are sdpa's."""
    torch.set_num_threads(1)
    model = vlm("mistral", sliding_window=5).float().eval()
    items = [make_item(3, 9, True, 0), make_item(6, 4, False, 1, slots=False), make_item(1, 2, True, 2)]
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    plain, packed = collator(items), PackedCollator(collator)(items)
    with torch.no_grad():
        ref_logits = run(model, plain).logits
        ref_loss = run(model, plain, compute_logits=False).loss
        ids = torch.randint(10, 390, (2, 12), generator=torch.Generator().manual_seed(0))  # longer than the window
        ref_gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=PAD)
        use_packed_attention(model.language_model)
        np.testing.assert_allclose(sample_loss_sums(ref_logits, plain["labels"], row_spans(plain)),
                                   sample_loss_sums(run(model, packed).logits, packed["labels"], packed["spans"]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(model, plain, compute_logits=False).loss, ref_loss, rtol=0, atol=1e-6)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False, pad_token_id=PAD)
    assert torch.equal(gen, ref_gen)


def test_flash_varlen_path_gets_the_boundaries_once(monkeypatch):
    """flash_attention_2 (not installed here: its attention function is replaced by a recorder that
    computes with the varlen SDPA): every layer gets the batch's own boundary tensors and ints,
    no mask, and the loss is the unpacked one. What flash_attn itself does with them is not run."""
    from transformers.modeling_utils import AttentionInterface

    torch.set_num_threads(1)
    model = vlm().float()
    items = items_mixed()[:4]
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    plain, packed = collator(items), PackedCollator(collator)(items)
    with torch.no_grad():
        ref = run(model, plain, compute_logits=False).loss
    seen = []

    def flash_recorder(module, q, k, v, mask, **kw):
        seen.append((mask, kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"], kw["max_length_k"]))
        return attention.sdpa_varlen_attention(module, q, k, v, mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", flash_recorder)
    model.language_model.config._attn_implementation = "flash_attention_2"
    assert use_packed_attention(model.language_model) == "flash_attention_2"  # kept as it is
    with torch.no_grad():
        loss = run(model, packed, compute_logits=False).loss
    assert abs(loss.item() - ref.item()) < 1e-5
    assert len(seen) == 2  # one call per layer
    for mask, cu_q, cu_k, max_q, max_k in seen:
        assert mask is None and cu_q is packed["cu_seq_lens_q"] and cu_k is packed["cu_seq_lens_k"]
        assert type(max_q) is int and max_q == max_k == packed["max_length_q"]


def test_packed_layout_boundaries_and_dummy_image():
    """The boundary tensors (int32 cumulative lengths, the longest segment), restarting positions,
    masked slots dropped with the positions after them kept; an image-less micro-batch gets one
    dummy image as an unsupervised segment of its own (counted in no counter)."""
    items = items_mixed()
    packed = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG))(items)
    cu, pos, labels = packed["cu_seq_lens_q"], packed["position_ids"][0], packed["labels"][0]
    assert cu.dtype == torch.int32 and cu is packed["cu_seq_lens_k"]
    lengths = [b - a for _, a, b in packed["spans"]]
    assert cu.tolist() == [0, *np.cumsum(lengths).tolist()] and packed["max_length_q"] == max(lengths)
    for k, (r, a, b) in enumerate(packed["spans"]):
        assert r == 0 and pos[a] == 0 and labels[a] == -100 and bool((pos[a:b].diff() > 0).all())
        seed_text_only = not items[k]["has_image"] and items[k]["image_start_idx"] >= 0
        if seed_text_only:  # the masked slots are dropped, the positions after them kept
            assert int(pos[b - 1]) == b - a - 1 + N_IMG
        else:
            assert torch.equal(pos[a:b], torch.arange(b - a))
    order = [k for k in range(len(items)) if items[k]["has_image"]]  # images in placeholder order
    assert torch.equal(packed["vision"]["pixel_values"], torch.stack([items[k]["image_data"] for k in order]))

    text_only = [make_item(10, 20, False, 1), make_item(1, 2, False, 2, slots=False)]
    flat = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG))(text_only)
    n_real = flat["num_attended_tokens"]
    assert flat["input_ids"].shape == (1, n_real + N_IMG) and flat["cu_seq_lens_q"][-2] == n_real
    assert (flat["input_ids"][0, n_real:] == IMAGE_ID).all() and (flat["labels"][0, n_real:] == -100).all()
    assert flat["vision"]["pixel_values"].shape[0] == 1 and not flat["vision"]["pixel_values"].any()
    assert flat["num_images"] == 0 and flat["num_samples"] == 2 and len(flat["spans"]) == 2
    nodummy = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG, dummy_images=False))(text_only)
    assert "vision" not in nodummy and not (nodummy["input_ids"] == IMAGE_ID).any()
    model = vlm().float()
    use_packed_attention(model.language_model)
    plain = TrainCollator(IMAGE_ID, PAD, N_IMG)(text_only)
    with torch.no_grad():
        torch.testing.assert_close(run(model, flat, compute_logits=False).loss,
                                   run(model, plain, compute_logits=False).loss, rtol=0, atol=1e-5)


# ------------------------------------------------------------ (b) micro-batch algorithms
def test_balance_tokens_invariants():
    rng = random.Random(0)
    for _ in range(200):
        bins = rng.randint(1, 8)
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(bins, 60))]
        capacity = rng.choice([10**9, max(lengths) * (len(lengths) // bins + 1)])
        groups = balance_tokens(lengths, bins, capacity)
        if groups is None:
            continue
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each sample once, whole
        assert len(groups) == bins and all(groups) and all(g == sorted(g) for g in groups)
        loads = [sum(lengths[i] for i in g) for g in groups]
        assert max(loads) <= capacity
        if capacity == 10**9:  # LPT: no group exceeds the lightest by more than the longest sample
            assert max(loads) - min(loads) <= max(lengths)
        assert balance_tokens(list(lengths), bins, capacity) == groups  # deterministic
    assert balance_tokens([5, 1, 4, 2, 3, 3], 2, 100) == [[0, 1, 5], [2, 3, 4]]  # 5+1+3 | 4+3+2
    assert balance_tokens([10, 10, 10], 2, 15) is None  # no room for the third sample
    with pytest.raises(ValueError):
        balance_tokens([3], 2, 10)


def test_group_by_cost_invariants():
    rng = random.Random(1)
    for _ in range(200):
        bins = rng.randint(1, 8)
        micro = rng.randint(1, 6)
        lengths = [rng.randint(1, 300) for _ in range(bins * micro)]
        capacity = micro * max(lengths)
        groups = group_by_cost(lengths, bins, capacity)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert len(groups) == bins and all(groups)
        flat = [i for g in groups for i in g]
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # consecutive in length order
        costs = [len(g) * max(lengths[i] for i in g) for g in groups]
        assert max(costs) <= capacity
        fixed = sorted(lengths, reverse=True)
        plain = max(micro * fixed[k * micro] for k in range(bins))  # equal-count groups of the sorted step
        assert max(costs) <= plain
    # one long sample among short ones: it travels alone, the short ones in larger groups
    assert group_by_cost([100, 10, 10, 10, 10, 10, 10, 10], 2, 400) == [[0], [1, 2, 3, 4, 5, 6, 7]]


def test_deal_to_ranks():
    assert deal_to_ranks([9, 1, 8, 2], 2) == [[0, 1], [2, 3]]
    assert deal_to_ranks([5, 5, 5], 3) == [[0], [1], [2]]
    with pytest.raises(ValueError):
        deal_to_ranks([1, 2, 3], 2)


# ---------------------------------------------------------------------- (c) step samplers
def test_packed_step_sampler_balances_and_resumes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=96)
    args = dict(n=96, global_batch=16, micro_batch=2, seed=3, shuffle=True, total_steps=15)
    for world in (1, 2, 4):
        plain = StepBatchSampler(world_size=1, rank=0, start_step=0, **args)
        samplers = [PackedStepSampler(lengths, 500, world_size=world, rank=r, start_step=0, **args)
                    for r in range(world)]
        for s in range(15):
            shares = [sp.step_micro_batches(s) for sp in samplers]
            assert all(len(mbs) == 16 // (2 * world) for mbs in shares)  # accumulation steps per rank
            flat = [i for mbs in shares for mb in mbs for i in mb]
            assert sorted(flat) == sorted(plain.step_indices(s))  # the step's samples, each once
            tokens = [sum(int(lengths[i]) for i in mb) for mbs in shares for mb in mbs]
            assert max(tokens) <= 2 * 500 and max(tokens) - min(tokens) <= max(lengths)
            rank_tokens = [sum(int(lengths[i]) for mb in mbs for i in mb) for mbs in shares]
            assert max(rank_tokens) - min(rank_tokens) <= max(lengths)
        for r, sp in enumerate(samplers):  # exact resume at any step; deterministic
            full = list(sp)
            assert len(full) == len(sp) == 15 * 16 // (2 * world)
            per_step = len(full) // 15
            for start in (0, 4, 11):
                again = PackedStepSampler(lengths, 500, world_size=world, rank=r, start_step=start, **args)
                assert list(again) == full[start * per_step :]
    # a token bound no balanced split keeps (samples longer than max_length, which valid data never
    # has: with samples of at most max_length, LPT always fits): the step keeps its plain split
    tight = PackedStepSampler([9] * 8, 5, 8, 8, 1, 0, 2, seed=0, shuffle=False, start_step=0, total_steps=1)
    assert tight.step_micro_batches(0) == tight.plain_micro_batches(0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # the padding samples of a last, partial step count as sample 0
    padded = PackedStepSampler([7, 1, 1, 1, 1], 8, 5, 4, 1, 0, 2, seed=0, shuffle=False, start_step=1,
                               total_steps=2, drop_last=False)
    assert sorted(padded.step_indices(1)) == [PAD_INDEX, PAD_INDEX, PAD_INDEX, 4]


def test_length_grouped_sampler_balances_ranks_and_resumes():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(500, 700, size=80), rng.integers(1500, 2000, size=16)])
    rng.shuffle(lengths)
    args = dict(n=96, global_batch=32, micro_batch=4, seed=3, shuffle=True, total_steps=3)

    def rank_costs(world, step):
        out = []
        for r in range(world):
            mbs = LengthGroupedStepSampler(lengths, world_size=world, rank=r, start_step=0, **args).step_micro_batches(step)
            out.append(sum(len(mb) * max(int(lengths[i]) for i in mb) for mb in mbs))
        return out

    for world in (1, 2, 8):
        plain = StepBatchSampler(world_size=1, rank=0, start_step=0, **args)
        for s in range(3):
            shares = [LengthGroupedStepSampler(lengths, world_size=world, rank=r, start_step=0,
                                               **args).step_micro_batches(s) for r in range(world)]
            assert all(len(mbs) == 32 // (4 * world) for mbs in shares)
            assert sorted(i for mbs in shares for mb in mbs for i in mb) == sorted(plain.step_indices(s))
            longest = max(int(lengths[i]) for i in plain.step_indices(s))
            assert all(len(mb) * max(int(lengths[i]) for i in mb) <= 4 * longest for mbs in shares for mb in mbs)
    # 8 ranks without accumulation: sorting and cutting in fours gives one rank the four longest
    # samples and the others far less; the even-cost cut evens the ranks out
    for s in range(3):
        glob = sorted(StepBatchSampler(world_size=1, rank=0, start_step=0, **args).global_indices(s),
                      key=lambda i: -lengths[i])
        old = [4 * int(lengths[glob[4 * k]]) for k in range(8)]
        new = rank_costs(8, s)
        assert max(new) < 0.8 * max(old) and sum(new) <= 1.05 * sum(old)
    # exact resume
    full = list(LengthGroupedStepSampler(lengths, world_size=2, rank=1, start_step=0, **args))
    again = list(LengthGroupedStepSampler(lengths, world_size=2, rank=1, start_step=2, **args))
    assert again == full[2 * len(full) // 3 :]

    # grouping cuts the padded width of the micro-batches
    def width(sampler):
        return sum(max(lengths[i] for i in b) * len(b) for b in sampler)
    kw = dict(world_size=1, rank=0, start_step=0, **args)
    assert width(LengthGroupedStepSampler(lengths, **kw)) < 0.85 * width(StepBatchSampler(**kw))


# ------------------------------------------------------------- (d) through the trainer CLI
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
ANSWERS = ["Red.", "A blue square on the left.", "Yes.", "Two green triangles and one yellow star.", "No."]


def make_data(root: Path, n: int = 24, msl: int = 256) -> Path:
    """vicuna_v1 data with widely varying lengths (1-3 turns, text-only samples), MSL 256."""
    from mmloom.testing import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(root / "tok")
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        color = list(COLORS.values())[i % 4]
        arr = np.clip(np.full((32, 32, 3), color, int) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / "images" / f"img{i}.png")
        turns = []
        for t in range(1 + i % 3 if i % 5 else 1):
            q = ("<image>\n" if t == 0 and i % 4 != 3 else "") + "What colour is the shape?"
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": ANSWERS[(i + t) % 5]}]
        rec = {"id": str(i), "conversations": turns}
        if i % 4 != 3:
            rec["image"] = f"img{i}.png"
        recs.append(rec)
    src = root / "jsonl"
    src.mkdir(exist_ok=True)
    (src / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = {"setup": {"input_dir": str(src), "output_dir": str(root / "h5"), "processes": 1, "samples_per_file": 10},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": msl},
           "dataset": {"num_patches": 16, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1"}}
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet", "--overwrite"]) == 0
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("packing_data"))


def train(data: Path, model_dir: Path, *sets: str) -> dict[int, dict]:
    start = json.loads((data / "h5" / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
    args = ["train", str(TINY / "phase2.yaml"), "--model-dir", str(model_dir), "--mode", "train"]
    for s in (f"train_input.data_dir={data / 'h5'}", f"train_input.img_data_dir={data / 'images'}",
              f"eval_input.data_dir={data / 'h5'}", f"eval_input.img_data_dir={data / 'images'}",
              f"model.image_start_idx={start}", "runconfig.checkpoint_path=null", "runconfig.max_steps=4",
              "runconfig.log_steps=1", "runconfig.save_final_model=false", "runconfig.checkpoint_steps=2",
              "train_input.micro_batch_size=4", *sets):
        args += ["--set", s]
    assert main(args) == 0
    lines = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def test_trainer_packing_and_grouping_match_plain(data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    shapes = {"packed": [], "plain": []}
    packed_call, plain_call = PackedCollator.__call__, TrainCollator.__call__

    def spy(kind, call):
        def wrapped(self, items):
            out = call(self, items)
            shapes[kind].append((len(items), *out["input_ids"].shape, out["num_attended_tokens"]))
            return out
        return wrapped

    monkeypatch.setattr(PackedCollator, "__call__", spy("packed", packed_call))
    monkeypatch.setattr(TrainCollator, "__call__", spy("plain", plain_call))
    lengths = sample_lengths(__import__("mmloom.data.hdf5_dataset", fromlist=["x"]).HDF5LlavaDataset(
        data / "h5", data / "images", None))
    assert lengths.max() - lengths.min() > 50 and lengths.max() <= 256  # varied lengths
    plain = train(data, tmp_path / "plain")
    packed = train(data, tmp_path / "packed", "train_input.packing=true")
    grouped = train(data, tmp_path / "grouped", "train_input.group_by_length=true")
    assert sorted(plain) == sorted(packed) == sorted(grouped) == [1, 2, 3, 4]
    plain_shapes, grouped_shapes = shapes["plain"][:8], shapes["plain"][8:]
    # packing: each micro-batch is one padding-free row; each step's 8 samples are split over its two
    # micro-batches at even token counts (not 4 + 4), computing far fewer positions than padded rows
    assert len(shapes["packed"]) == 8 and all(r == 1 for _, r, _, _ in shapes["packed"])
    assert [a[0] + b[0] for a, b in zip(shapes["packed"][::2], shapes["packed"][1::2], strict=True)] == [8] * 4
    assert all(t - real in (0, 16) for _, _, t, real in shapes["packed"])  # no padding (a dummy image at most)
    assert sum(t for _, _, t, _ in shapes["packed"]) < sum(r * t for _, r, t, _ in plain_shapes)
    # plain rows are trimmed to each micro-batch's longest sample; grouping makes them narrower still
    assert all(t <= 256 for _, _, t, _ in plain_shapes)
    assert sum(t for _, _, t, _ in grouped_shapes) < sum(t for _, _, t, _ in plain_shapes)
    print("packed (samples, tokens)", [(n, t) for n, _, t, _ in shapes["packed"]], "grouped widths",
          [t for _, _, t, _ in grouped_shapes])
    print("loss diffs", [abs(o[s]["loss"] - plain[s]["loss"]) for o in (packed, grouped) for s in plain])
    for s in plain:
        for other in (packed, grouped):
            assert abs(other[s]["loss"] - plain[s]["loss"]) < 2e-5, (s, plain[s]["loss"], other[s]["loss"])
            assert other[s]["loss_tokens"] == plain[s]["loss_tokens"]
            assert abs(other[s]["grad_norm"] - plain[s]["grad_norm"]) < 1e-4 * max(1.0, plain[s]["grad_norm"])
    # packing / grouping resume exactly: continuing from checkpoint-2 gives the same steps 3 and 4
    for key, ref in (("packing", packed), ("group_by_length", grouped)):
        name = "packed" if key == "packing" else "grouped"
        again = train(data, tmp_path / f"resume_{key}", f"train_input.{key}=true",
                      f"runconfig.checkpoint_path={tmp_path / name / 'checkpoint-2'}",
                      "runconfig.load_checkpoint_states=all")
        assert sorted(again) == [3, 4]
        assert all(again[s]["loss"] == ref[s]["loss"] for s in (3, 4))
