"""Batching HDF5 samples (the Cerebras layout) into what the composite LLaVA model takes."""

from __future__ import annotations

import torch

from mmloom.errors import MmloomError

IGNORE_INDEX = -100


def check_slots(item: dict, num_slots: int) -> tuple[int, int] | None:
    """`(start, end)` of an `HDF5LlavaDataset` item's image slots, from its recorded position.

    None when the sample has no slots. Raises MmloomError (naming the sample) when the recorded
    run does not fit the sample: past its end, attended differently from what its image says
    (a sample with an image attends to its slots, a text-only one masks them), or supervised.
    """
    start = int(item.get("image_start_idx", -1))
    if start < 0:
        if item["has_image"]:
            raise MmloomError(f"sample {item.get('index', '?')} has an image but no recorded image slots")
        return None
    end = start + int(num_slots)
    kpm = item["key_padding_mask"]
    index = item.get("index", "?")
    if end > kpm.shape[0]:
        raise MmloomError(
            f"sample {index}: image slots {start}..{end - 1} run past its {kpm.shape[0]} positions "
            "(num_patches of the data and of the model disagree?)"
        )
    masked = kpm[start:end]
    if item["has_image"] and bool(masked.any()):
        raise MmloomError(f"sample {index}: some of its image slots {start}..{end - 1} are marked as padding")
    if not item["has_image"] and not bool(masked.all()):
        return None  # a text-only sample without masked slots: no room for a dummy image
    if bool(item["loss_mask"][max(start - 1, 0) : end - 1].any()):
        raise MmloomError(f"sample {index}: loss on its image slots {start}..{end - 1}")
    return start, end


class LlavaCollator:
    """Collate `HDF5LlavaDataset` items into an HF-style batch.

    Returns a dict with
    - `input_ids` (B, T) long: the text ids; the image slots of samples with an image (their
      recorded `[image_start_idx, image_start_idx + num_image_tokens)`) hold `image_token_id`;
    - `attention_mask` (B, T) long = 1 - key_padding_mask (text-only samples' slots are 0);
    - `labels` (B, T) long, HF convention (unshifted, -100 = ignore):
      `labels[t+1] = input_ids[t+1] if loss_mask[t] else -100`, `labels[0] = -100`;
    - `pixel_values` (N_images, 3, H, W): the images of the samples that have one, in batch
      order, or None when no sample has one;
    - `num_loss_tokens` int: number of labels != -100 (for token-level loss normalisation);
    - `has_image` (B,) bool; `slots`: per sample `(start, end)` of its slot run or None.
    With `trim=True`, trailing columns that are padding in every sample are dropped.
    `pad_token_id` is what packed rows are padded with (the ids of padding are never attended).
    """

    def __init__(self, image_token_id: int, pad_token_id: int, num_image_tokens: int, trim: bool = False):
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.trim = trim

    def __call__(self, batch: list[dict]) -> dict:
        ids = torch.stack([b["text_input_ids"] for b in batch]).long()
        kpm = torch.stack([b["key_padding_mask"] for b in batch]).long()
        loss = torch.stack([b["loss_mask"] for b in batch]).long()
        has_image = torch.tensor([bool(b["has_image"]) for b in batch], dtype=torch.bool)

        attention_mask = 1 - kpm
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 1:] = torch.where(loss[:, :-1] == 1, ids[:, 1:], IGNORE_INDEX)
        slots = [check_slots(b, self.num_image_tokens) for b in batch]
        input_ids = ids.clone()
        for i, span in enumerate(slots):
            if span is not None and bool(has_image[i]):
                input_ids[i, span[0] : span[1]] = self.image_token_id

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
            "slots": slots,
        }
