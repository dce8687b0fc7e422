"""Batching HDF5 samples (the Cerebras layout) into what the composite LLaVA model takes."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class LlavaCollator:
    """Collate `HDF5LlavaDataset` items into an HF-style batch.

    Returns a dict with
    - `input_ids` (B, T) long: the text ids; the image slots (pad ids that are attended) of
      samples with an image hold `image_token_id`, one per image feature;
    - `attention_mask` (B, T) long = 1 - key_padding_mask (text-only samples' slots are 0);
    - `labels` (B, T) long, HF convention (unshifted, -100 = ignore):
      `labels[t+1] = input_ids[t+1] if loss_mask[t] else -100`, `labels[0] = -100`;
    - `pixel_values` (N_images, 3, H, W): the images of the samples that have one, in batch
      order, or None when no sample has one;
    - `num_loss_tokens` int: number of labels != -100 (for token-level loss normalisation);
    - `has_image` (B,) bool.
    With `trim=True`, trailing columns that are padding in every sample are dropped.
    """

    def __init__(self, image_token_id: int, pad_token_id: int, trim: bool = False):
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.trim = trim

    def __call__(self, batch: list[dict]) -> dict:
        ids = torch.stack([b["text_input_ids"] for b in batch]).long()
        kpm = torch.stack([b["key_padding_mask"] for b in batch]).long()
        loss = torch.stack([b["loss_mask"] for b in batch]).long()
        has_image = torch.tensor([bool(b["has_image"]) for b in batch], dtype=torch.bool)

        attention_mask = 1 - kpm
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 1:] = torch.where(loss[:, :-1] == 1, ids[:, 1:], IGNORE_INDEX)
        slots = (ids == self.pad_token_id) & (attention_mask == 1) & has_image[:, None]
        input_ids = torch.where(slots, torch.full_like(ids, self.image_token_id), ids)

        if self.trim:
            used = attention_mask.any(dim=0).nonzero()
            length = int(used.max()) + 1 if used.numel() else 1
            input_ids, attention_mask, labels = (
                input_ids[:, :length],
                attention_mask[:, :length],
                labels[:, :length],
            )

        images = [b["image_data"] for b, h in zip(batch, has_image.tolist(), strict=True) if h]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack(images) if images else None,
            "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "has_image": has_image,
        }
