"""Collating the audio clips of HDF5 samples on top of the run's collator (padded or packed rows).

`AudioCollator` wraps `TrainCollator` or `PackedCollator` (see `mmloom.data.collate`): it writes
the audio placeholder id into every clip's slots before the wrapped collator lays the rows out,
then stacks the clips' features in the order their placeholders appear in the rows (row-major, as
the model fills them), and, when a micro-batch has no clip, adds a dummy one so that the audio
encoder and projector run on every micro-batch of every rank (DDP and FSDP need the same
parameters used everywhere), as `TrainCollator` does for images.
"""

from __future__ import annotations

import torch

from mmloom.errors import MmloomError
from mmloom.processing.audio import FEATURE_MASK


def check_audio_spans(item: dict, length: int) -> None:
    """Raise MmloomError (naming the sample) when a clip's slots run past the row, are marked as
    padding, or are supervised."""
    kpm, loss = item["key_padding_mask"], item["loss_mask"]
    for clip in item.get("audio", []):
        start, n = clip["span"]
        end = start + n
        index = item.get("index", "?")
        if start < 0 or n < 1 or end > length:
            raise MmloomError(f"sample {index}: audio slots {start}..{end - 1} do not fit its {length} positions")
        if bool(kpm[start:end].any()):
            raise MmloomError(f"sample {index}: some of its audio slots {start}..{end - 1} are marked as padding")
        if bool(loss[max(start - 1, 0): end - 1].any()):
            raise MmloomError(f"sample {index}: loss on its audio slots {start}..{end - 1}")


class AudioCollator:
    """Adds `audio = {"input_features": (N, n_mels, F), "feature_attention_mask": (N, F)}` (the batch
    format: `mmloom.model.batch`) and `num_audio` (real clips) to the batches of `base`; `token_id` is the model's audio
    placeholder id; `dummy_clip` (`AudioClipReader.dummy()`, or None for no dummy) the clip given to
    micro-batches without audio, in an extra sample whose tokens carry no label and are counted
    nowhere."""

    def __init__(self, base, token_id: int, dummy_clip: dict | None = None, modality: str = "audio"):
        self.base = base
        self.token_id = int(token_id)
        self.dummy_clip = dummy_clip
        self.modality = modality

    def __getattr__(self, name):  # settings of the wrapped collator
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _mark(self, item: dict) -> dict:
        clips = item.get("audio") or []
        if not clips:
            return item
        ids = item["text_input_ids"].clone()
        check_audio_spans(item, ids.shape[0])
        for clip in clips:
            start, n = clip["span"]
            ids[start:start + n] = self.token_id
        return {**item, "text_input_ids": ids}

    def _dummy_item(self, like: dict) -> dict:
        length = like["text_input_ids"].shape[0]
        n = int(self.dummy_clip["span"][1])
        if n > length:
            raise MmloomError(f"the dummy audio clip needs {n} positions, more than the rows' {length}")
        ids = torch.zeros_like(like["text_input_ids"])
        ids[:n] = self.token_id
        kpm = torch.ones_like(like["key_padding_mask"])
        kpm[:n] = 0
        image = like.get("image_data")
        return {
            "text_input_ids": ids, "key_padding_mask": kpm, "loss_mask": torch.zeros_like(like["loss_mask"]),
            "labels": torch.zeros_like(like["labels"]), "has_image": False, "image_start_idx": -1, "index": -1,
            "image_data": None if image is None else torch.zeros_like(image), "audio": [self.dummy_clip],
        }

    def __call__(self, items: list[dict]) -> dict:
        items = [self._mark(item) for item in items]
        n_real = len(items)
        num_audio = sum(len(item.get("audio") or []) for item in items)
        if num_audio == 0 and self.dummy_clip is not None and items:
            items = [*items, self._dummy_item(items[0])]
        batch = self.base(items)
        order = list(range(len(items)))
        spans = batch.get("spans")
        if spans is not None:  # packed rows: samples in (row, start) order
            order.sort(key=lambda k: (spans[k][0], spans[k][1]) if spans[k] is not None else (1 << 30, k))
        clips = [clip for k in order for clip in (items[k].get("audio") or [])]
        if len(items) > n_real:  # the dummy sample is nobody's: take it out of the counters
            dummy_tokens = int(self.dummy_clip["span"][1])
            batch["num_attended_tokens"] = batch.get("num_attended_tokens", dummy_tokens) - dummy_tokens
            batch["num_samples"] = n_real
            for key in ("has_image", "slots", "spans"):
                if batch.get(key) is not None:
                    batch[key] = batch[key][:n_real]
        if clips:
            inputs = {
                "input_features": torch.stack([c["input_features"] for c in clips]),
                FEATURE_MASK: torch.stack([c[FEATURE_MASK] for c in clips]),
            }
            batch[self.modality] = inputs
        batch["num_audio"] = num_audio
        return batch
