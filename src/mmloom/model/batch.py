"""The batch format every producer emits (collators, `MultimodalProcessor`) and the helpers that read it.

A batch is a dict:

- `input_ids` (B, T) long, or (1, N) for a packed row; `attention_mask` (B, T), None for a packed row;
  `labels` (B, T) long, HF convention (unshifted, -100 = ignored);
- packed rows only: `position_ids` (1, N), `cu_seq_lens_q` / `cu_seq_lens_k` (S + 1,) int32 and
  `max_length_q` / `max_length_k` int over the S segments (`mmloom.model.attention.varlen_kwargs`);
- one dict per modality with items in the batch (the key is absent otherwise), holding that
  modality's encoder inputs, the items in the order of their placeholders, row-major (packed rows:
  segment order), which is the order `MultimodalModel` fills them:
  `vision`: `{"pixel_values": (N_img, 3, H, W)}` or, from a feature cache,
  `{"module_features": (N_img, L, D)}` (+ `image_sizes` for anyres processors);
  `audio`: `{"input_features": (N_clip, n_mels, F), "feature_attention_mask": (N_clip, F)}`;
- bookkeeping of the collators, never given to the model: `num_loss_tokens`, `num_attended_tokens`,
  `num_samples`, `num_images`, `num_audio`, `has_image` (B,), `image_counts` (images per sample),
  `slots`, `spans`.

The dict-valued entries are exactly the modality inputs: :func:`model_inputs` selects them by
that, so a new modality needs no change here.
"""

from __future__ import annotations

from typing import Any

import torch

from mmloom.model.attention import VARLEN_KWARGS

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", *VARLEN_KWARGS)


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with its tensors (also those inside the modality dicts) moved to `device`
    (non-blocking: overlaps with compute from pinned memory); other values as they are."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value

    return {key: move(value) for key, value in batch.items()}


def modality_inputs(batch: dict) -> dict[str, dict[str, Any]]:
    """The per-modality encoder inputs of a batch: its dict-valued entries, empty ones left out."""
    return {key: value for key, value in batch.items() if isinstance(value, dict) and value}


def model_inputs(batch: dict, device: torch.device | str | None = None) -> dict[str, Any]:
    """`MultimodalModel`'s keyword arguments from any batch of the format above: the ids, the
    attention mask (None for packed rows), the packed positions and sample boundaries when set,
    and every modality dict. Labels and the bookkeeping are left out; with `device`, tensors are
    moved there (:func:`batch_to_device`)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    for key in TEXT_INPUTS[2:]:  # packed rows: positions restart per sample, boundaries once per batch
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    inputs.update(modality_inputs(batch))
    return inputs if device is None else batch_to_device(inputs, device)


def item_count(batch: dict, modality: str, input_name: str | None = None) -> int:
    """Items of `modality` in a batch, dummy items included: the rows of its `input_name` tensor
    (default: its first tensor); 0 when the batch has no such input."""
    inputs = batch.get(modality)
    if not isinstance(inputs, dict):
        return 0
    if input_name is None:
        input_name = next((k for k, v in inputs.items() if isinstance(v, torch.Tensor)), None)
    value = inputs.get(input_name) if input_name is not None else None
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else 0
