"""Multimodal sequence packing and length-grouped batching for the HDF5 LLaVA data.

Most LLaVA samples are far shorter than the data's max sequence length (MSL), so fixed-length
rows are mostly padding. Two remedies, both keeping the step's samples (and so the loss, the
epoch and the learning-rate schedule) unchanged:

- **packing** (`PackedCollator`): the samples of a micro-batch are cut to their real tokens and
  concatenated, whole, into as few rows of at most `max_length` tokens as fit (first-fit
  decreasing, `pack_samples`). Attention never crosses a sample boundary: a block-diagonal causal
  4D mask for SDPA/eager, or (flash_attention_2) one padding-free row whose restarting
  `position_ids` transformers turns into varlen flash attention. Each sample keeps its own
  position ids (0, 1, ... as if it ran alone) and the label at its first token is -100, so no
  token predicts across a boundary. Image spans are never split (whole samples only).
- **length grouping** (`LengthGroupedStepSampler` + `TrainCollator(trim=True)`): the global batch
  of each step is sorted by length before it is cut into micro-batches, so each micro-batch holds
  samples of similar length and its trailing padding columns can be dropped.

Text-only samples of the HDF5 layout carry masked image slots in the middle of the sequence.
Packing drops them (and keeps the original position ids of the tokens after them, so the sample
computes exactly what it computes unpacked); when a micro-batch has no real image and
`dummy_images` is on, one dummy image goes in as its own unsupervised segment that nothing
attends to, so the vision encoder and projector still run on every micro-batch (DDP / FSDP).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmloom.training.data import StepBatchSampler

IGNORE_INDEX = -100
ATTENTION_MODES = ("sdpa", "eager", "flash")


# ------------------------------------------------------------------------------- packing
def pack_samples(samples: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample lengths into rows of at most `max_length`.

    Returns the rows as lists of sample indices (each index exactly once; a row's indices in
    ascending order; rows in the order they were opened). Deterministic: ties in length are
    broken by index. Samples are never split; one longer than `max_length` raises ValueError.
    """
    lengths = [int(x) for x in samples]
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        if n < 0:
            raise ValueError(f"sample {i} has a negative length ({n})")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return [sorted(row) for row in rows]


def block_causal_mask(segments: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """(R, T) segment ids (-1 = padding) -> (R, 1, T, T) bool mask, True = attend.

    Causal within each segment; padding positions attend to themselves only (no fully masked
    query row, hence no NaN) and nothing attends to them. `additive`: a float32 mask instead
    (0 = attend, the float32 minimum = masked), which eager attention needs (it adds the mask
    to the scores; transformers passes a ready 4D mask through unchanged).
    """
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real_key = (segments >= 0)[:, None, :]
    mask = same & causal & real_key
    mask |= torch.eye(T, dtype=torch.bool)
    if additive:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)[:, None]
    return mask[:, None]


class PackedCollator:
    """Pack a micro-batch of `HDF5LlavaDataset` items into rows (see the module docstring).

    `collator` is the run's `TrainCollator`: its `LlavaCollator` does the per-sample work (labels,
    image slots), its `dummy_images`/`num_image_tokens`/`image_token_id` are honoured.
    `attention`: "sdpa" (a 4D block-diagonal causal bool mask), "eager" (the same mask, additive
    float32) or "flash" (flash_attention_2: one padding-free row, `attention_mask=None`,
    restarting `position_ids`; transformers runs varlen flash attention only for batch size 1).

    Returns `input_ids`, `labels` (HF convention, -100 at every sample's first token),
    `position_ids` (restarting at 0 per sample), `attention_mask`, `pixel_values` (row order,
    matching the placeholder order) and the counters `TrainCollator` gives (`num_loss_tokens`,
    `num_attended_tokens` = real tokens, `num_samples`, `num_images` = real images, `has_image`),
    plus `num_rows` and `spans`: per input sample `(row, start, end)` in the packed rows.
    """

    def __init__(self, collator, max_length: int, attention: str = "sdpa", pad_to_multiple_of: int = 1):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.collator = collator
        self.max_length = int(max_length)
        self.attention = attention
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))

    def segments(self, items: list[dict]) -> tuple[list[dict], dict]:
        """Per sample: its real tokens (`ids`, `labels`, `pos`) and its image (or None)."""
        base = self.collator.base
        batch = base(items)
        images = iter(batch["pixel_values"] if batch["pixel_values"] is not None else [])
        out = []
        for i in range(len(items)):
            keep = batch["attention_mask"][i].nonzero().flatten()
            labels = batch["labels"][i, keep].clone()
            if keep.numel():
                labels[0] = IGNORE_INDEX  # the previous segment's last token must not predict this one
                gap = torch.ones_like(keep, dtype=torch.bool)
                gap[1:] = keep[1:] - keep[:-1] != 1
                labels[gap] = IGNORE_INDEX  # a token whose predecessor was dropped (masked slots)
            image = next(images) if bool(batch["has_image"][i]) else None
            out.append({"ids": batch["input_ids"][i, keep], "labels": labels, "pos": keep, "image": image})
        return out, batch

    def __call__(self, items: list[dict]) -> dict:
        segs, batch = self.segments(items)
        n_real = len(segs)
        num_tokens = sum(int(s["ids"].numel()) for s in segs)
        has_image = batch["has_image"]
        c = self.collator
        if getattr(c, "dummy_images", False) and not bool(has_image.any()) and items:
            n = int(c.num_image_tokens)
            segs.append({
                "ids": torch.full((n,), int(c.image_token_id), dtype=torch.long),
                "labels": torch.full((n,), IGNORE_INDEX, dtype=torch.long),
                "pos": torch.arange(n),
                "image": torch.zeros_like(items[0]["image_data"]),
            })
        lengths = [int(s["ids"].numel()) for s in segs]
        if self.attention == "flash":
            rows = [list(range(len(segs)))]  # one padding-free row: varlen flash needs batch size 1
        else:
            rows = pack_samples(lengths, self.max_length)
        width = max([1, *(sum(lengths[i] for i in row) for row in rows)])
        m = self.pad_to_multiple_of
        width = -(-width // m) * m
        R = len(rows)
        pad = int(c.base.pad_token_id)
        input_ids = torch.full((R, width), pad, dtype=torch.long)
        labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((R, width), dtype=torch.long)
        seg_ids = torch.full((R, width), -1, dtype=torch.long)
        pixel_values, spans = [], [None] * n_real
        for r, row in enumerate(rows):
            at = 0
            for k in row:
                s, n = segs[k], lengths[k]
                input_ids[r, at : at + n] = s["ids"]
                labels[r, at : at + n] = s["labels"]
                position_ids[r, at : at + n] = s["pos"]
                seg_ids[r, at : at + n] = k
                if s["image"] is not None:
                    pixel_values.append(s["image"])
                if k < n_real:
                    spans[k] = (r, at, at + n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)  # padding tail: a segment of its own
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": None if self.attention == "flash" else block_causal_mask(
                seg_ids, additive=self.attention == "eager"),
            "pixel_values": torch.stack(pixel_values) if pixel_values else None,
            "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "num_attended_tokens": num_tokens,
            "num_samples": n_real,
            "num_images": int(has_image.sum()),
            "has_image": has_image,
            "num_rows": R,
            "spans": spans,
        }
        return out


# ------------------------------------------------------------------------ length grouping
def sample_lengths(dataset) -> np.ndarray:
    """Per sample: the last attended position + 1 (what a trimmed row needs), as int64.

    Reads the `key_padding_mask` rows of `HDF5LlavaDataset` files directly (no image decoding);
    other datasets may provide `sample_lengths()`, else every item is loaded once.
    """
    if hasattr(dataset, "sample_lengths"):
        return np.asarray(dataset.sample_lengths(), dtype=np.int64)
    files = getattr(dataset, "files", None)
    if files is not None and hasattr(dataset, "counts"):
        import h5py

        out = []
        for path in files:
            with h5py.File(path, "r") as f:
                data = f["data"]
                for a in range(0, data.shape[0], 4096):
                    kpm = np.asarray(data[a : a + 4096, 3, :])
                    out.append(_span(kpm))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return np.concatenate([_span(dataset[i]["key_padding_mask"].numpy()[None]) for i in range(len(dataset))])


def _span(kpm: np.ndarray) -> np.ndarray:
    attended = kpm == 0
    last = kpm.shape[1] - 1 - np.argmax(attended[:, ::-1], axis=1)
    return np.where(attended.any(axis=1), last + 1, 0).astype(np.int64)


class LengthGroupedStepSampler(StepBatchSampler):
    """`StepBatchSampler` whose micro-batches hold samples of similar length.

    Each step's global batch is the same as without grouping (same samples per step, so the
    same loss, epoch and schedule); it is sorted by length (longest first, ties by position),
    cut into micro-batches, and the micro-batches are dealt to the ranks in turn (rank r gets
    micro-batches r, r + W, ...), which keeps the ranks' work balanced. A pure function of the
    step, so resuming at any step is exact.
    """

    def __init__(self, lengths, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) != self.n:
            raise ValueError(f"{len(self.lengths)} lengths for {self.n} samples")

    def step_indices(self, step: int) -> list[int]:
        batch = self.global_indices(step)
        batch = [batch[j] for j in sorted(range(len(batch)), key=lambda j: (-int(self.lengths[batch[j]]), j))]
        chunks = [batch[i : i + self.micro_batch] for i in range(0, len(batch), self.micro_batch)]
        return [i for chunk in chunks[self.rank :: self.world_size] for i in chunk]


# ------------------------------------------------------------------------- trainer wiring
def train_collator(collator, section, dataset, attn_implementation: str | None):
    """The training collator for `train_input` (`packing`, `group_by_length`)."""
    if section.packing:
        impl = str(attn_implementation or "sdpa")
        attention = "flash" if "flash" in impl else "eager" if impl == "eager" else "sdpa"
        return PackedCollator(collator, dataset.max_sequence_length, attention=attention)
    return collator  # rows are already trimmed to the batch's longest sample


def step_sampler(lengths, *args, **kwargs) -> StepBatchSampler:
    """`StepBatchSampler(*args)`, length-grouped when `lengths` is given."""
    if lengths is None:
        return StepBatchSampler(*args, **kwargs)
    return LengthGroupedStepSampler(lengths, *args, **kwargs)
