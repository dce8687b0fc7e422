"""Causal-LM loss computed only at supervised positions, in chunks.

Image slots and prompts are most of a LLaVA sequence, so running the LM head over every
position wastes compute and memory: here it runs only where the (shifted) label is kept, a
chunk at a time, each chunk recomputed in backward so full-vocabulary logits for the whole
batch are never held. `supervised_token_stats` gives evaluation the same economy (loss sum,
token count and argmax accuracy at supervised positions, no full-vocabulary logits), and
`supervised_token_logps` gives preference tuning each supervised token's log-probability (the
sequence log-probabilities DPO compares), with the same chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import ModelOutput

from mmloom.model.merge import IGNORE_INDEX


def _chunk_logits(hidden: torch.Tensor, head: nn.Module, softcap: float | None, scale: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None,
                    scale: float | None) -> torch.Tensor:
    return F.cross_entropy(_chunk_logits(hidden, head, softcap, scale), targets, reduction="sum")


def _supervised(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) states of the positions whose next token is supervised, their (N,) targets, and the
    (B, T-1) bool map of those positions."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    return hidden_states[:, :-1][keep], targets[keep], keep


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
    selected, targets, keep = _supervised(hidden_states, labels)
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


@dataclass
class SupervisedTokenStats(ModelOutput):
    """Evaluation figures of a batch at its supervised positions (no logits kept).

    `loss`: mean token loss (0 without supervised tokens); `loss_sum`: float32 sum of the token
    cross-entropies; `num_tokens`: supervised tokens; `num_correct`: tokens whose argmax
    prediction is the label (ties go to the lowest id, as `torch.argmax`). All 0-dim tensors.
    """

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None


@torch.no_grad()
def supervised_token_stats(
    hidden_states: torch.Tensor,  # (B, T, D) final decoder states
    labels: torch.Tensor,  # (B, T) unshifted, -100 = ignore
    lm_head: nn.Module,
    chunk_size: int = 2048,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> SupervisedTokenStats:
    """Loss sum, token count and argmax-correct count at the supervised positions only: the LM
    head runs on (chunks of) those positions, never on the whole (B, T, V)."""
    selected, targets, _ = _supervised(hidden_states, labels)
    loss_sum = hidden_states.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden_states.device)
    for start in range(0, selected.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = _chunk_logits(selected[chunk], lm_head, softcap, logit_scale)
        loss_sum = loss_sum + F.cross_entropy(logits, targets[chunk], reduction="sum")
        correct = correct + (logits.argmax(-1) == targets[chunk]).sum()
    n = torch.tensor(selected.shape[0], dtype=torch.long, device=hidden_states.device)
    return SupervisedTokenStats(loss=loss_sum / n.clamp(min=1), loss_sum=loss_sum, num_tokens=n, num_correct=correct)


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None,
                       scale: float | None) -> torch.Tensor:
    return -F.cross_entropy(_chunk_logits(hidden, head, softcap, scale), targets, reduction="none")


@dataclass
class TokenLogps(ModelOutput):
    """Per-token log-probabilities of the labels (no logits kept).

    `token_logps` (B, T-1) float32: at position t, log p(labels[t+1] | tokens <= t) where labels[t+1] is
    supervised, 0 elsewhere (differentiable); `num_tokens`: supervised tokens (0-dim long)."""

    token_logps: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


def supervised_token_logps(
    hidden_states: torch.Tensor,  # (B, T, D) final decoder states
    labels: torch.Tensor,  # (B, T) unshifted, -100 = ignore
    lm_head: nn.Module,
    chunk_size: int = 2048,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> TokenLogps:
    """Log-probabilities of the supervised next tokens, as a (B, T-1) map (0 where not supervised); the LM
    head runs on chunks of the supervised positions only, each chunk recomputed in backward (as
    `supervised_loss`), so no (B, T, V) logits are held. Summed over a sequence's completion they give the
    sequence log-probability of preference tuning (`mmloom.model.preference_loss`)."""
    selected, targets, keep = _supervised(hidden_states, labels)
    values = []
    for start in range(0, selected.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (selected[chunk], targets[chunk], lm_head, softcap, logit_scale)
        if torch.is_grad_enabled() and selected.requires_grad:
            values.append(checkpoint(_chunk_token_logps, *args, use_reentrant=False))
        else:
            values.append(_chunk_token_logps(*args))
    out = hidden_states.new_zeros(keep.shape, dtype=torch.float32)
    if values:
        out = out.masked_scatter(keep, torch.cat(values))
    else:
        out = out + hidden_states.float().sum() * 0.0  # in the graph: backward works on every rank
    return TokenLogps(token_logps=out, num_tokens=keep.sum())
