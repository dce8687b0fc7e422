"""Causal-LM loss computed only at supervised positions, in chunks.

Image slots and prompts are most of a LLaVA sequence, so running the LM head over every
position wastes compute and memory: here it runs only where the (shifted) label is kept, a
chunk at a time, each chunk recomputed in backward so full-vocabulary logits for the whole
batch are never held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmloom.model.merge import IGNORE_INDEX


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None,
                    scale: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_loss(
    hidden_states: torch.Tensor,  # (B, T, D) final decoder states
    labels: torch.Tensor,  # (B, T) unshifted, -100 = ignore
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 2048,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised tokens (or sum / num_items_in_batch), a
    float32 scalar. With no supervised token it is 0 but still part of the graph (a zero
    gradient), so `backward()` works on every micro-batch and every rank."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    selected = hidden_states[:, :-1][keep]  # (N, D)
    targets = targets[keep]  # (N,)
    total = hidden_states.new_zeros((), dtype=torch.float32)
    if selected.shape[0] == 0:
        total = total + hidden_states.float().sum() * 0.0
    for start in range(0, selected.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (selected[chunk], targets[chunk], lm_head, softcap, logit_scale)
        if torch.is_grad_enabled() and selected.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*args)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator
