"""Preference-tuning losses on sequence log-probabilities: DPO (`sigmoid`), IPO, robust DPO and hinge, as TRL's
`DPOTrainer` (trl 1.16, `_compute_loss`, `f_divergence_type="reverse_kl"`) defines them.

With `delta = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)` per pair (log-probabilities summed
over each answer's tokens):

- `sigmoid` (DPO, Rafailov et al. 2023): `-(1 - eps) logsigmoid(beta delta) - eps logsigmoid(-beta delta)`; with
  `label_smoothing` eps > 0 this is conservative DPO (cDPO); eps = 0 is TRL 1.16's `sigmoid`;
- `ipo` (Azar et al. 2023): `(delta' - 1 / (2 beta))^2`, with delta' made of per-token *averages* of each
  answer's log-ratio (TRL's normalisation, confirmed with the IPO authors);
- `robust` (Chowdhury et al. 2024): `((1 - eps)(-logsigmoid(beta delta)) + eps logsigmoid(-beta delta)) / (1 - 2 eps)`;
- `hinge` (SLiC): `relu(1 - beta delta)`.

RPO (Pang et al. 2024, TRL's `rpo_alpha`; TRL 1.16: `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, alpha]`) adds
`alpha * NLL(chosen)` to any of these, the NLL being the chosen answers' mean token cross-entropy: the sum of their
negative log-probabilities (`chosen_nll_sum`) over the number of their tokens (TRL: of the batch's chosen tokens,
not a mean of per-answer means; `mmloom.training.preference` takes the whole optimizer step's tokens).

Rewards are `beta (logp - ref)` of each answer, detached; reward accuracy is the share of pairs whose chosen
reward exceeds the rejected one, the margin their mean difference (TRL's `rewards/*` metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


@dataclass
class PairLogps:
    """Per pair (P,): the policy's and the reference's summed log-probabilities of each answer, and each answer's
    supervised token count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_losses(logps: PairLogps, loss_type: str = "sigmoid", beta: float = 0.1,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The (P,) per-pair losses of `loss_type` (see the module docstring). Raises ValueError for an unknown type."""
    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if loss_type == "ipo":
        average = (chosen_ratio / logps.chosen_tokens.clamp(min=1)
                   - rejected_ratio / logps.rejected_tokens.clamp(min=1))
        return (average - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return ((1 - eps) * -F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    raise ValueError(f"unknown preference loss {loss_type!r}; one of {', '.join(LOSS_TYPES)}")


def chosen_nll_sum(logps: PairLogps, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RPO's negative log-likelihood of the chosen answers, as (sum over their tokens, their token count), 0-dim,
    padding pairs (`weights` 0) left out; the mean token cross-entropy is the first over the second, taken over
    as many micro-batches as the step has (the sum keeps its gradient, the count is detached)."""
    return -(logps.chosen * weights).sum(), (logps.chosen_tokens * weights).sum().detach()


def preference_sums(logps: PairLogps, beta: float, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (weighted: 0 for padding pairs) of what metrics.jsonl reports as means: rewards of
    each answer, reward accuracy and margin, log-probabilities; 0-dim float64 tensors, detached."""
    with torch.no_grad():
        w = weights.double()
        chosen_rewards = beta * (logps.chosen - logps.ref_chosen).double()
        rejected_rewards = beta * (logps.rejected - logps.ref_rejected).double()
        return {
            "rewards/chosen": (chosen_rewards * w).sum(),
            "rewards/rejected": (rejected_rewards * w).sum(),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).double() * w).sum(),
            "rewards/margins": ((chosen_rewards - rejected_rewards) * w).sum(),
            "logps/chosen": (logps.chosen.double() * w).sum(),
            "logps/rejected": (logps.rejected.double() * w).sum(),
        }


def sequence_token_counts(labels: torch.Tensor, spans: list[tuple[int, int, int]] | None,
                          count: int) -> torch.Tensor:
    """(count,) supervised tokens of the first `count` sequences of a batch (rows or `spans` as `sequence_logps`)."""
    supervised = (labels[:, 1:] != -100).float()
    if spans is None:
        return supervised[:count].sum(dim=1)
    return torch.stack([supervised[row, start:end - 1].sum() for row, start, end in spans[:count]])


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]] | None,
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, supervised tokens), each (count,), of the first `count` sequences of a batch.

    `token_logps` (B, T-1) from `MultimodalModel(..., token_logps=True)`, `labels` (B, T). Padded rows: sequence
    i is row i. Packed rows (`spans`: per sequence `(row, start, end)`): sequence i is positions start..end-1 of
    its row, whose labels are predicted from positions start..end-2."""
    supervised = (labels[:, 1:] != -100).to(token_logps.dtype)
    if spans is None:
        return token_logps[:count].sum(dim=1), supervised[:count].sum(dim=1)
    sums, tokens = [], []
    for row, start, end in spans[:count]:
        sums.append(token_logps[row, start:end - 1].sum())
        tokens.append(supervised[row, start:end - 1].sum())
    return torch.stack(sums), torch.stack(tokens)
