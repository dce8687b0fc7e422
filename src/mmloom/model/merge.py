"""Merge projected encoder features into the language model's input embeddings."""

from __future__ import annotations

import torch

from mmloom.errors import MmloomError

IGNORE_INDEX = -100


class PlaceholderMismatchError(MmloomError):
    """The placeholder tokens of a sample do not match the features of its items."""


def check_placeholder_counts(
    counts: list[int], item_lengths: list[int], modality: str, placeholder_id: int
) -> None:
    """Assign items to samples in order and check every sample gets exactly its placeholder count.
    Raises PlaceholderMismatchError (an MmloomError) naming the sample whose placeholder count differs from
    its items' feature tokens, or when items are left over."""
    item = 0
    for sample, need in enumerate(counts):
        got, first = 0, item
        while got < need and item < len(item_lengths):
            got += item_lengths[item]
            item += 1
        if got != need:
            taken = item_lengths[first:item]
            raise PlaceholderMismatchError(
                f"sample {sample}: {need} {modality} placeholder tokens (id {placeholder_id}) but "
                f"{got} {modality} features from {len(taken)} item(s) (feature tokens per item: "
                f"{taken if taken else 'none left'}) — the prompt and the inputs disagree (truncated prompt "
                "or wrong number of items?)"
            )
    if item != len(item_lengths):
        raise PlaceholderMismatchError(
            f"{len(item_lengths) - item} {modality} item(s) left over after filling every sample's "
            f"placeholders ({sum(counts)} placeholder tokens, {len(item_lengths)} items given)"
        )


def merge_features(
    input_ids: torch.Tensor,  # (B, T)
    inputs_embeds: torch.Tensor,  # (B, T, D)
    features: torch.Tensor | list[torch.Tensor],  # (N, L, D), N x (L_i, D), or a flat (total_tokens, D)
    placeholder_id: int,
    modality: str,
) -> torch.Tensor:
    """Scatter item features, in order, into the placeholder positions of each sample.

    Items fill the samples in order; each sample must get exactly its placeholder count
    (PlaceholderMismatchError names the sample and both feature counts). A flat
    `(total_tokens, D)` stream has no item boundaries: only its total is checked. Features are
    cast to the embeddings' dtype.
    """
    mask = input_ids == placeholder_id  # (B, T)
    counts = mask.sum(dim=1).tolist()
    if isinstance(features, (list, tuple)):
        item_lengths = [f.shape[0] for f in features]
        flat = torch.cat(list(features)) if features else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    elif features.dim() == 3:
        item_lengths = [features.shape[1]] * features.shape[0]
        flat = features.reshape(-1, features.shape[-1])
    elif features.dim() == 2:
        item_lengths, flat = None, features
    else:
        raise MmloomError(
            f"{modality} features must be (N, L, D), (total_tokens, D) or a list of (L_i, D); got shape "
            f"{tuple(features.shape)}"
        )
    if flat.shape[-1] != inputs_embeds.shape[-1]:
        raise MmloomError(
            f"{modality} features have width {flat.shape[-1]} but the language model's embeddings are "
            f"{inputs_embeds.shape[-1]} wide"
        )
    if item_lengths is not None:
        check_placeholder_counts(counts, item_lengths, modality, placeholder_id)
    elif sum(counts) != flat.shape[0]:
        per_sample = ", ".join(f"sample {i}: {n}" for i, n in enumerate(counts))
        raise PlaceholderMismatchError(
            f"{sum(counts)} {modality} placeholder tokens (id {placeholder_id}; {per_sample}) but {flat.shape[0]} "
            f"{modality} features (one flat (total_tokens, D) tensor, item boundaries unknown) — the prompt and "
            "the inputs disagree (truncated prompt or wrong number of items?)"
        )
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat.to(inputs_embeds.dtype))
