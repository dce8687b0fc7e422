"""Step samplers: every rank's share of each step, epochs with and without drop_last."""

from __future__ import annotations

import torch

from mmloom.data.sampling import (
    PAD_INDEX,
    LengthGroupedStepSampler,
    PaddedDataset,
    StepBatchSampler,
    steps_per_epoch,
)


def epoch_indices(sampler: StepBatchSampler, epoch: int) -> list[int]:
    steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
    return [i for s in steps for i in sampler.global_indices(s)]


def test_drop_last_true_skips_the_partial_batch():
    s = StepBatchSampler(10, 4, 1, 0, 2, seed=0, shuffle=True, start_step=0, total_steps=4)
    assert s.steps_per_epoch == steps_per_epoch(10, 4) == 2
    seen = epoch_indices(s, 0)
    assert len(seen) == 8 and len(set(seen)) == 8 and PAD_INDEX not in seen


def test_drop_last_false_sees_every_sample_once_per_epoch():
    for world in (1, 2):
        shares = []
        for rank in range(world):
            s = StepBatchSampler(10, 4, world, rank, 1, seed=3, shuffle=True, start_step=0, total_steps=6,
                                 drop_last=False)
            assert s.steps_per_epoch == 3
            shares.append(s)
        for epoch in (0, 1):
            seen = epoch_indices(shares[0], epoch)
            assert sorted(i for i in seen if i != PAD_INDEX) == list(range(10)) and seen.count(PAD_INDEX) == 2
        # each rank gets the same number of micro-batches per step (padding fills the last step)
        assert {len(list(s)) for s in shares} == {6 * 4 // world}
    grouped = LengthGroupedStepSampler(list(range(10)), 10, 4, 1, 0, 2, seed=0, shuffle=False, start_step=2,
                                       total_steps=3, drop_last=False)
    assert grouped.step_indices(2) == [9, 8, PAD_INDEX, PAD_INDEX]


def test_padding_samples_carry_no_loss():
    items = [{"loss_mask": torch.ones(5, dtype=torch.int32), "x": 1}]
    padded = PaddedDataset(items)
    assert padded[0] is items[0] and len(padded) == 1
    assert not padded[PAD_INDEX]["loss_mask"].any() and padded[PAD_INDEX]["x"] == 1
