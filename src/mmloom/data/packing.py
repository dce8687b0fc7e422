"""Multimodal sequence packing: which samples share a row, and the attention mask that keeps them apart.

Most LLaVA samples are far shorter than the data's max sequence length (MSL), so fixed-length
rows are mostly padding. Two remedies, both keeping the step's samples (and so the loss, the
epoch and the learning-rate schedule) unchanged:

- **packing** (`mmloom.data.collate.PackedCollator`, with `pack_samples` and `block_causal_mask`
  from here): the samples of a micro-batch are cut to their real tokens and
  concatenated, whole, into as few rows of at most `max_length` tokens as fit (first-fit
  decreasing, `pack_samples`). Attention never crosses a sample boundary: a block-diagonal causal
  4D mask for SDPA/eager, or (flash_attention_2) one padding-free row whose restarting
  `position_ids` transformers turns into varlen flash attention. Each sample keeps its own
  position ids (0, 1, ... as if it ran alone) and the label at its first token is -100, so no
  token predicts across a boundary. Image spans are never split (whole samples only).
- **length grouping** (`mmloom.data.sampling.LengthGroupedStepSampler` + `TrainCollator(trim=True)`): the global batch
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

import torch


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


