"""Which samples each step and each rank reads: deterministic, resumable batch samplers.

Step `s` uses global batch `k = s % steps_per_epoch` of epoch `s // steps_per_epoch` (a seeded
permutation per epoch when shuffling). `StepBatchSampler`: rank `r` takes its contiguous share of
that global batch and splits it into micro-batches of `micro_batch` samples.
`LengthGroupedStepSampler` and `PackedStepSampler` split the same global batch (same samples per
step) into micro-batches of even cost and deal them evenly to the ranks (see
`mmloom.data.packing`). Every sampler is a pure function of the step, so the position of a run is
just its step count. `EvalSampler` strides all samples over the ranks, padded with index -1
(`PaddedDataset`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from mmloom.data.packing import balance_tokens, deal_to_ranks, group_by_cost
from mmloom.errors import MmloomError

PAD_INDEX = -1  # a padding sample: `PaddedDataset` gives sample 0 with no supervised token


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The sample order of `epoch`: 0..n-1, or a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank, steps `start_step .. total_steps - 1`.

    `drop_last` (the default): an epoch is `n // global_batch` steps and the samples past the last
    full global batch are not seen in that epoch. Otherwise an epoch is `ceil(n / global_batch)`
    steps and the last global batch is filled up with `PAD_INDEX` (wrap the dataset in
    `PaddedDataset`: those samples carry no supervised token, so they change neither the loss nor
    the gradients).

    Raises MmloomError when the dataset holds fewer samples than one global batch.
    """

    def __init__(self, n: int, global_batch: int, world_size: int, rank: int, micro_batch: int, seed: int,
                 shuffle: bool, start_step: int, total_steps: int, drop_last: bool = True):
        self.n, self.global_batch, self.world_size, self.rank = n, global_batch, world_size, rank
        self.micro_batch, self.seed, self.shuffle = micro_batch, seed, shuffle
        self.start_step, self.total_steps = start_step, total_steps
        self.drop_last = drop_last
        self.steps_per_epoch = steps_per_epoch(n, global_batch, drop_last)
        self.per_rank = global_batch // world_size
        if n < global_batch:
            raise MmloomError(f"the dataset has {n} samples, fewer than one global batch ({global_batch})")

    def global_indices(self, step: int) -> list[int]:
        """All ranks' indices for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, epoch, self.seed, self.shuffle)
        batch = order[k * self.global_batch : (k + 1) * self.global_batch]
        return batch + [PAD_INDEX] * (self.global_batch - len(batch))

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank and step."""
        return self.per_rank // self.micro_batch

    def plain_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's contiguous share of the step's global batch, in micro-batches of `micro_batch`."""
        batch = self.global_indices(step)
        mine = batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of indices) for optimizer step `step` (0-based): always
        `accumulation` of them."""
        return self.plain_micro_batches(step)

    def step_indices(self, step: int) -> list[int]:
        """This rank's indices for optimizer step `step` (0-based), micro-batch after micro-batch."""
        return [i for mb in self.step_micro_batches(step) for i in mb]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield from self.step_micro_batches(step)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accumulation


def sample_lengths(dataset, attended_only: bool = False) -> np.ndarray:
    """Per sample, as int64: the last attended position + 1 (what a trimmed padded row needs), or
    with `attended_only` the number of attended tokens (what a packed row holds: the masked image
    slots of text-only samples in the seed's layout are not counted).

    Reads the `key_padding_mask` rows of `HDF5LlavaDataset` files directly (no image decoding;
    the rows are stored gzip-compressed per sample, so this reads the whole files once); other
    datasets may provide `sample_lengths(attended_only)`, else every item is loaded once.
    """
    if hasattr(dataset, "sample_lengths"):
        return np.asarray(dataset.sample_lengths(attended_only), dtype=np.int64)
    measure = _attended if attended_only else _span
    files = getattr(dataset, "files", None)
    if files is not None and hasattr(dataset, "counts"):
        import h5py

        out = []
        for path in files:
            with h5py.File(path, "r") as f:
                data = f["data"]
                for a in range(0, data.shape[0], 4096):
                    kpm = np.asarray(data[a : a + 4096, 3, :])
                    out.append(measure(kpm))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return np.concatenate([measure(dataset[i]["key_padding_mask"].numpy()[None]) for i in range(len(dataset))])


def _span(kpm: np.ndarray) -> np.ndarray:
    attended = kpm == 0
    last = kpm.shape[1] - 1 - np.argmax(attended[:, ::-1], axis=1)
    return np.where(attended.any(axis=1), last + 1, 0).astype(np.int64)


def _attended(kpm: np.ndarray) -> np.ndarray:
    return (kpm == 0).sum(axis=1).astype(np.int64)


class _LengthAwareSampler(StepBatchSampler):
    """A `StepBatchSampler` that knows every sample's length (`PAD_INDEX` counts as sample 0,
    which `PaddedDataset` gives in its place)."""

    def __init__(self, lengths, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) != self.n:
            raise ValueError(f"{len(self.lengths)} lengths for {self.n} samples")

    def length(self, index: int) -> int:
        return int(self.lengths[0 if index == PAD_INDEX else index])

    def _dealt(self, batch: list[int], groups: list[list[int]], costs: list[int]) -> list[list[int]]:
        """This rank's share of the step's micro-batches (`groups` index into `batch`)."""
        mine = deal_to_ranks(costs, self.world_size)[self.rank]
        return [[batch[j] for j in groups[k]] for k in mine]


class LengthGroupedStepSampler(_LengthAwareSampler):
    """`StepBatchSampler` whose micro-batches hold samples of similar length, at even cost.

    Each step's global batch is the same as without grouping (same samples per step, so the
    same loss, epoch and schedule). It is sorted by length (longest first) and cut into
    ranks x accumulation micro-batches whose padded cost (samples x longest) is as even as
    possible (`mmloom.data.packing.group_by_cost`: long samples in smaller micro-batches, short
    ones in larger ones; no micro-batch costs more than `micro_batch` x the step's longest
    sample, what the first micro-batch of a length-sorted step costs); the micro-batches are
    dealt so that every rank gets the same number and about the same total cost
    (`deal_to_ranks`). `lengths`: each sample's padded width (`sample_lengths`). A pure function
    of the step, so resuming at any step is exact.
    """

    def step_micro_batches(self, step: int) -> list[list[int]]:
        batch = self.global_indices(step)
        length = [self.length(i) for i in batch]
        groups = group_by_cost(length, self.world_size * self.accumulation, self.micro_batch * max(length))
        costs = [len(g) * max(length[j] for j in g) for g in groups]
        return self._dealt(batch, groups, costs)


class PackedStepSampler(_LengthAwareSampler):
    """`StepBatchSampler` for packed micro-batches (`PackedCollator`: one padding-free row each).

    Each step's global batch is the same as without packing; its samples are split into
    ranks x accumulation micro-batches of nearly equal token counts
    (`mmloom.data.packing.balance_tokens`, at most `micro_batch` x `max_length` tokens each: what
    a padded micro-batch of `micro_batch` samples of `max_length` holds), which are dealt so that
    every rank gets the same number and about the same tokens (`deal_to_ranks`). A micro-batch
    may hold more or fewer than `micro_batch` samples. If the balanced split cannot respect the
    token bound, the step keeps the plain split (`plain_micro_batches`). `lengths`: each sample's
    attended tokens (`sample_lengths(dataset, attended_only=True)`). A pure function of the step,
    so resuming at any step is exact.
    """

    def __init__(self, lengths, max_length: int, *args, **kwargs):
        super().__init__(lengths, *args, **kwargs)
        self.max_length = int(max_length)

    def step_micro_batches(self, step: int) -> list[list[int]]:
        batch = self.global_indices(step)
        length = [self.length(i) for i in batch]
        groups = balance_tokens(length, self.world_size * self.accumulation, self.micro_batch * self.max_length)
        if groups is None:
            return self.plain_micro_batches(step)
        return self._dealt(batch, groups, [sum(length[j] for j in g) for g in groups])


class EvalSampler(Sampler[list[int]]):
    """All eval samples, strided over ranks; every rank gets the same number of batches
    (missing slots are filled with index -1, which the collator turns into an unsupervised sample)."""

    def __init__(self, n: int, world_size: int, rank: int, micro_batch: int):
        self.n, self.world_size, self.rank, self.micro_batch = n, world_size, rank, micro_batch
        per_rank = -(-n // world_size)
        self.batches = -(-per_rank // micro_batch)
        own = list(range(rank, n, world_size))
        own += [-1] * (self.batches * micro_batch - len(own))
        self.indices = own

    def __iter__(self):
        for b in range(self.batches):
            yield self.indices[b * self.micro_batch : (b + 1) * self.micro_batch]

    def __len__(self) -> int:
        return self.batches


def steps_per_epoch(n: int, global_batch: int, drop_last: bool = True) -> int:
    """Optimizer steps in one pass over `n` samples (see `StepBatchSampler`)."""
    return n // global_batch if drop_last else -(-n // global_batch)


class PaddedDataset(torch.utils.data.Dataset):
    """`PAD_INDEX` (-1) gives a copy of sample 0 with no supervised token (padding of the last
    batch of an eval pass, or of a training epoch with `drop_last: false`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):  # files, counts, max_sequence_length, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index >= 0:
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["loss_mask"] = torch.zeros_like(item["loss_mask"])
        return item


