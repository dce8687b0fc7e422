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
    """Assign items to samples in order and check every sample gets exactly its placeholder count."""
    item = 0
    for sample, need in enumerate(counts):
        got, first = 0, item
        while got < need and item < len(item_lengths):
            got += item_lengths[item]
            item += 1
        if got != need:
            raise PlaceholderMismatchError(
                f"sample {sample}: {need} {modality} placeholder tokens (id {placeholder_id}) but "
                f"{got} {modality} features from {item - first} item(s); each item gives "
                f"{item_lengths[first] if first < len(item_lengths) else 0} features — the prompt and "
                "the inputs disagree (truncated prompt or wrong number of items?)"
            )
    if item != len(item_lengths):
        raise PlaceholderMismatchError(
            f"{len(item_lengths) - item} {modality} item(s) left over after filling every sample's "
            f"placeholders ({sum(counts)} placeholder tokens, {len(item_lengths)} items given)"
        )


def merge_features(
    input_ids: torch.Tensor,  # (B, T)
    inputs_embeds: torch.Tensor,  # (B, T, D)
    features: torch.Tensor | list[torch.Tensor],  # (N, L, D) or N x (L_i, D)
    placeholder_id: int,
    modality: str,
) -> torch.Tensor:
    """Scatter item features, in order, into the placeholder positions of each sample."""
    mask = input_ids == placeholder_id  # (B, T)
    item_lengths = [f.shape[0] for f in features] if isinstance(features, list) else [features.shape[1]] * len(features)
    check_placeholder_counts(mask.sum(dim=1).tolist(), item_lengths, modality, placeholder_id)
    flat = torch.cat(list(features)) if isinstance(features, list) else features.reshape(-1, features.shape[-1])
    if flat.shape[-1] != inputs_embeds.shape[-1]:
        raise MmloomError(
            f"{modality} features have width {flat.shape[-1]} but the language model's hidden size is "
            f"{inputs_embeds.shape[-1]}"
        )
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat.to(inputs_embeds.dtype))
