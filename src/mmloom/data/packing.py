"""Which samples of a step share a micro-batch, and which rank runs each micro-batch.

Most LLaVA samples are far shorter than the data's max sequence length (MSL), and their lengths
vary widely, so micro-batches of a fixed sample count cost very different amounts: padded rows
waste the difference, and in data-parallel training every rank waits for the slowest one. Two
remedies, both keeping each step's samples (and so the loss, with its token-level normalisation
over the whole step, the epoch and the learning-rate schedule) unchanged, and both pure functions
of the step's sample lengths (so resuming at any step is exact):

- **packing** (`train_input.packing`; `mmloom.data.sampling.PackedStepSampler` with
  `balance_tokens`, and `mmloom.data.collate.PackedCollator`): each micro-batch is one
  padding-free row of whole samples (nothing is computed for padding: the fill ratio is 100%
  by construction, a dummy image's segment in an image-less micro-batch aside), and each sample
  attends to itself only (`mmloom.model.attention`: per-sample SDPA or varlen flash attention;
  no (T, T) mask). A row's cost is its token count, so the step's samples (the global batch of
  all ranks) are dealt, longest first, to the micro-batch with the fewest tokens so far
  (`balance_tokens`, LPT), then the micro-batches to the ranks (`deal_to_ranks`): every rank
  gets the same work.
- **length grouping** (`train_input.group_by_length`; `mmloom.data.sampling.LengthGroupedStepSampler`
  with `group_by_cost`): padded rows, trimmed to each micro-batch's longest sample. The step's
  samples are sorted by length and cut into micro-batches whose padded cost (samples x longest)
  is as even as possible, so long samples travel in smaller micro-batches and short ones in
  larger ones; then `deal_to_ranks`.

Memory: no micro-batch holds more tokens than `capacity` (packing: micro_batch_size x MSL, what
a padded micro-batch of the configured size holds; grouping: micro_batch_size x the step's
longest sample, what the first micro-batch of a length-sorted step holds).
"""

from __future__ import annotations

from collections.abc import Sequence


def _check(lengths: Sequence[int], bins: int) -> list[int]:
    values = [int(x) for x in lengths]
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if len(values) < bins:
        raise ValueError(f"{len(values)} samples cannot fill {bins} micro-batches")
    if any(x < 0 for x in values):
        raise ValueError(f"negative sample length in {values}")
    return values


def balance_tokens(lengths: Sequence[int], bins: int, capacity: int) -> list[list[int]] | None:
    """Split samples into `bins` non-empty groups of nearly equal token totals (LPT).

    Samples go longest first (ties by index) to the group with the fewest tokens so far (ties by
    group number) among those with room under `capacity` tokens, empty groups first while any
    remain, so every group gets at least one sample. Returns each group's sample indices
    (ascending), or None when some sample finds no room (the caller keeps its plain split).
    Deterministic. Raises ValueError for fewer samples than bins.
    """
    values = _check(lengths, bins)
    groups: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    for rank, i in enumerate(order):
        remaining = len(values) - rank  # samples still to place, this one included
        empty = [g for g in range(bins) if not groups[g]]
        candidates = empty if len(empty) >= remaining else range(bins)
        fits = [g for g in candidates if load[g] + values[i] <= capacity]
        if not fits:
            return None
        g = min(fits, key=lambda g: (load[g], g))
        groups[g].append(i)
        load[g] += values[i]
    return [sorted(g) for g in groups]


def group_by_cost(lengths: Sequence[int], bins: int, capacity: int) -> list[list[int]]:
    """Cut samples, sorted by length (longest first, ties by index), into `bins` consecutive
    non-empty groups whose padded cost (samples x the group's longest) is as even as possible.

    Finds the smallest cost bound X for which cutting greedily (each group takes samples while
    its count x its first length <= X) needs at most `bins` groups, searched up to `capacity`
    (and never below the longest sample); then splits the largest groups until there are
    exactly `bins`. Returns the groups as lists of sample indices, longest group first.
    Deterministic. Raises ValueError for fewer samples than bins.
    """
    values = _check(lengths, bins)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    widths = [max(values[i], 1) for i in order]

    def cut(bound: int) -> list[tuple[int, int]]:
        spans, a = [], 0
        while a < len(widths):
            b = a + max(1, bound // widths[a])
            spans.append((a, min(b, len(widths))))
            a = spans[-1][1]
        return spans

    lo, hi = widths[0], max(widths[0], int(capacity))
    if len(cut(hi)) > bins:  # even the bound `capacity` needs more groups: equal counts, as without grouping
        size = -(-len(widths) // bins)
        spans = [(a, min(a + size, len(widths))) for a in range(0, len(widths), size)]
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if len(cut(mid)) <= bins:
                hi = mid
            else:
                lo = mid + 1
        spans = cut(lo)
    while len(spans) < bins:  # split the group with the most samples (the last, shortest, on ties)
        k = max(range(len(spans)), key=lambda j: (spans[j][1] - spans[j][0], j))
        a, b = spans[k]
        spans[k : k + 1] = [(a, (a + b + 1) // 2), ((a + b + 1) // 2, b)]
    return [[order[j] for j in range(a, b)] for a, b in spans]


def deal_to_ranks(costs: Sequence[int], ranks: int) -> list[list[int]]:
    """Give `len(costs)` micro-batches (a multiple of `ranks`) to the ranks, the same number
    each, their total costs as even as possible: costliest first, each to the rank with the
    least total among those still short of their share (ties by rank). Returns, per rank, its
    micro-batch numbers in ascending order. Raises ValueError when the count does not divide.
    """
    n = len(costs)
    if ranks < 1 or n % ranks:
        raise ValueError(f"{n} micro-batches cannot be shared evenly by {ranks} ranks")
    share = n // ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    total = [0] * ranks
    for k in sorted(range(n), key=lambda k: (-int(costs[k]), k)):
        r = min((r for r in range(ranks) if len(owned[r]) < share), key=lambda r: (total[r], r))
        owned[r].append(k)
        total[r] += int(costs[k])
    return [sorted(o) for o in owned]
