"""Sequence packing and length-grouped batching: exact parity with unpacked batches (per-sample
losses, gradients, trainer losses), pack_samples invariants, exact resume of grouped batches."""

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
from mmloom.data.packing import block_causal_mask, pack_samples
from mmloom.data.sampling import LengthGroupedStepSampler, StepBatchSampler, sample_lengths

PAD, N_IMG, MSL = 3, 16, 64
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def make_item(prefix: int, answer: int, has_image: bool, seed: int, msl: int = MSL) -> dict:
    """A HDF5LlavaDataset-like item: BOS, prompt, 16 slots (masked for text-only), supervised answer."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(10, 390, (n,), generator=g).tolist()  # noqa: E731
    ids = [0, *words(prefix), *([PAD] * N_IMG), *words(3), *words(answer)]
    n = len(ids)
    s = 1 + prefix
    kpm = [0] * n + [1] * (msl - n)
    loss = [0] * msl
    for t in range(n - answer - 1, n - 1):  # loss_mask[t] = 1: token t+1 is supervised
        loss[t] = 1
    if not has_image:
        kpm[s : s + N_IMG] = [1] * N_IMG
    image = torch.rand(3, 32, 32, generator=g) if has_image else torch.zeros(3, 32, 32)
    return {
        "text_input_ids": torch.tensor(ids + [PAD] * (msl - n), dtype=torch.int32),
        "loss_mask": torch.tensor(loss, dtype=torch.int32),
        "key_padding_mask": torch.tensor(kpm, dtype=torch.int32),
        "labels": torch.zeros(msl, dtype=torch.int32),
        "image_data": image,
        "has_image": has_image,
        "image_start_idx": s,
        "index": seed,
    }


def items_mixed() -> list[dict]:
    spec = [(3, 9, True), (10, 20, False), (2, 4, True), (5, 30, True), (1, 2, False), (4, 12, True)]
    return [make_item(p, a, h, seed=i) for i, (p, a, h) in enumerate(spec)]


def sample_loss_sums(logits: torch.Tensor, labels: torch.Tensor, spans) -> list[float]:
    out = []
    for r, a, b in spans:
        lg, lb = logits[r, a : b - 1], labels[r, a + 1 : b]
        keep = lb != -100
        out.append(float(F.cross_entropy(lg[keep].double(), lb[keep], reduction="sum")))
    return out


def run(model, batch, **kw):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"], "labels": batch["labels"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return model(**inputs, **kw)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------- (a) exact parity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(attn):
    torch.set_num_threads(1)
    model = vlm(attn_implementation=attn).float()
    items = items_mixed()
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    plain = collator(items)
    packed = PackedCollator(collator, max_length=MSL, attention=attn)(items)
    assert packed["num_rows"] < len(items)
    assert packed["num_loss_tokens"] == plain["num_loss_tokens"]
    assert packed["num_attended_tokens"] == plain["num_attended_tokens"]
    assert packed["pixel_values"].shape[0] == 4  # the real images only (no dummies needed)

    # per-sample losses from full logits
    with torch.no_grad():
        lp = run(model, plain).logits
        lk = run(model, packed).logits
    spans_plain = [(i, 0, int(plain["attention_mask"][i].nonzero().max()) + 1) for i in range(len(items))]
    a = sample_loss_sums(lp, plain["labels"], spans_plain)
    b = sample_loss_sums(lk, packed["labels"], packed["spans"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(lk.numpy()).flat)  # padding rows did not produce NaN

    # total loss and gradients through the fast (supervised-only) path
    denom = torch.tensor(float(plain["num_loss_tokens"]))
    model.zero_grad()
    loss_a = run(model, plain, compute_logits=False, num_items_in_batch=denom).loss
    loss_a.backward()
    ga = grads(model)
    model.zero_grad()
    loss_b = run(model, packed, compute_logits=False, num_items_in_batch=denom).loss
    loss_b.backward()
    gb = grads(model)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert abs(loss_a.item() - sum(a) / float(denom)) < 1e-4
    assert set(ga) == set(gb) and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flash_layout_and_dummy_image():
    """flash: one padding-free row, no mask; the segments are where position_ids restart.
    Checked by running that layout with the equivalent block mask. Text-only micro-batches get
    one dummy image as an unsupervised segment of its own."""
    torch.set_num_threads(1)
    model = vlm().float()
    items = [make_item(10, 20, False, 1), make_item(1, 2, False, 2), make_item(4, 6, False, 3)]
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    flat = PackedCollator(collator, max_length=MSL, attention="flash")(items)
    assert flat["attention_mask"] is None and flat["input_ids"].shape[0] == 1
    assert flat["pixel_values"].shape[0] == 1 and not flat["pixel_values"].any()  # one dummy
    assert int((flat["input_ids"] == IMAGE_ID).sum()) == N_IMG
    assert flat["num_images"] == 0 and flat["num_samples"] == 3
    pos = flat["position_ids"][0]
    segments = (pos == 0).long().cumsum(0)[None] - 1
    emulated = {**flat, "attention_mask": block_causal_mask(segments)}
    plain = collator(items)
    with torch.no_grad():
        lp = run(model, plain).logits
        lk = run(model, emulated).logits
    spans_plain = [(i, 0, int(plain["attention_mask"][i].nonzero().max()) + 1) for i in range(len(items))]
    np.testing.assert_allclose(sample_loss_sums(lp, plain["labels"], spans_plain),
                               sample_loss_sums(lk, flat["labels"], flat["spans"]), rtol=1e-5, atol=1e-5)
    # without dummy images: no image at all
    nodummy = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG, dummy_images=False), MSL)(items)
    assert nodummy["pixel_values"] is None and not (nodummy["input_ids"] == IMAGE_ID).any()


# --------------------------------------------------------------------- (b) pack_samples
def test_pack_samples_invariants():
    rng = random.Random(0)
    for _ in range(50):
        max_length = rng.choice([16, 64, 100])
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(0, 40))]
        rows = pack_samples(lengths, max_length)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each sample once, whole
        assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
        assert all(row == sorted(row) and row for row in rows)
        assert len(rows) >= -(-sum(lengths) // max_length)
        assert len(rows) <= max(1, -(-sum(lengths) * 2 // max_length))  # FFD: rows at least half full
        assert pack_samples(list(lengths), max_length) == rows  # deterministic
    assert pack_samples([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack_samples([6, 4, 7, 3], 10) == [[2, 3], [0, 1]]
    assert pack_samples([], 8) == []
    with pytest.raises(ValueError):
        pack_samples([3, 9], 8)


# ------------------------------------------------------------ (c) positions, labels, mask
def test_positions_labels_and_mask():
    items = items_mixed()
    packed = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG), max_length=MSL)(items)
    pos, labels, mask = packed["position_ids"], packed["labels"], packed["attention_mask"]
    R, T = packed["input_ids"].shape
    assert mask.shape == (R, 1, T, T) and mask.dtype == torch.bool
    seen = set()
    for k, (r, a, b) in enumerate(packed["spans"]):
        assert pos[r, a] == 0 and labels[r, a] == -100
        assert bool((pos[r, a:b].diff() > 0).all())
        if items[k]["has_image"]:  # image samples keep every token: 0, 1, 2, ...
            assert torch.equal(pos[r, a:b], torch.arange(b - a))
        else:  # text-only: the masked slots are dropped, the positions after them kept
            assert int(pos[r, b - 1]) == b - a - 1 + N_IMG
        block = mask[r, 0, a:b, a:b]
        assert torch.equal(block, torch.ones(b - a, b - a, dtype=torch.bool).tril())
        assert not mask[r, 0, a:b, :a].any() and not mask[r, 0, a:b, b:].any()
        seen |= {(r, t) for t in range(a, b)}
    for r in range(R):
        for t in range(T):
            if (r, t) not in seen:  # padding: attends to itself only
                assert packed["input_ids"][r, t] == PAD and labels[r, t] == -100
                assert mask[r, 0, t].nonzero().flatten().tolist() == [t]
    # the image order matches the placeholder order
    order = [k for r in range(R) for k, s in sorted(enumerate(packed["spans"]), key=lambda x: x[1][1])
             if s[0] == r and items[k]["has_image"]]
    expected = torch.stack([items[k]["image_data"] for k in order])
    assert torch.equal(packed["pixel_values"], expected)


# --------------------------------------------------------- (e) length-grouped batching
def test_length_grouped_sampler_groups_and_resumes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=96)
    args = dict(n=96, global_batch=16, micro_batch=2, seed=3, shuffle=True, total_steps=15)
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        grouped = LengthGroupedStepSampler(lengths, world_size=world, rank=rank, start_step=0, **args)
        plain = StepBatchSampler(world_size=world, rank=rank, start_step=0, **args)
        full = list(grouped)
        assert len(full) == len(grouped) == len(plain)
        per_step = len(full) // 15
        for s in range(15):
            batches = full[s * per_step : (s + 1) * per_step]
            glob = sorted(plain.global_indices(s), key=lambda i: -lengths[i])
            chunks = [glob[i : i + 2] for i in range(0, 16, 2)]
            assert batches == chunks[rank::world]  # similar lengths together, dealt to ranks in turn
        # exact resume at any step; deterministic
        for start in (0, 4, 11):
            tail = list(LengthGroupedStepSampler(lengths, world_size=world, rank=rank, start_step=start, **args))
            assert tail == full[start * per_step :]
    # every rank together: the same samples per step as without grouping
    for s in range(15):
        both = [i for r in (0, 1) for i in LengthGroupedStepSampler(lengths, world_size=2, rank=r, start_step=0,
                                                                     **args).step_indices(s)]
        assert sorted(both) == sorted(StepBatchSampler(world_size=1, rank=0, start_step=0, **args).step_indices(s))
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
            shapes[kind].append((len(items), *out["input_ids"].shape))
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
    # the packed run packed (4 samples per micro-batch into fewer rows); grouping trimmed columns
    assert len(shapes["packed"]) == 8 and all(n == 4 for n, _, _ in shapes["packed"])
    assert sum(r for _, r, _ in shapes["packed"]) < 0.8 * 32
    plain_shapes, grouped_shapes = shapes["plain"][:8], shapes["plain"][8:]
    # plain rows are trimmed to each micro-batch's longest sample; grouping makes them narrower still
    assert all(t <= 256 for _, _, t in plain_shapes)
    assert sum(t for _, _, t in grouped_shapes) < sum(t for _, _, t in plain_shapes)
    print("packed rows", [r for _, r, _ in shapes["packed"]], "grouped widths", [t for *_, t in grouped_shapes])
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
