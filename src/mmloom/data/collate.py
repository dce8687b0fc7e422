"""Collators: dataset items -> the batches the composite model takes.

- `LlavaCollator`: `HDF5LlavaDataset` items (the Cerebras layout) -> HF-style padded rows;
- `TrainCollator`: the same, plus a dummy image in the masked slots of text-only samples;
- `PackedCollator`: whole samples packed into one padding-free row (see `mmloom.data.packing`);
- `FeatureCollator`: items with cached encoder features instead of images;
- `MediaCollator`: on top of any of them, the items of another modality (`HDF5LlavaDataset`'s
  `media_readers`) in their slots, with a dummy item for micro-batches without one;
- `collate_jsonl`: `JsonlLlavaDataset` items (HF style, no slots for text-only samples).

Every batch follows the batch format of `mmloom.model.batch`.
"""

from __future__ import annotations

from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.model.attention import varlen_kwargs
from mmloom.model.merge import IGNORE_INDEX
from mmloom.processing.processor import pad_rows


def check_slots(item: dict, num_feature_tokens: int) -> tuple[int, int] | None:
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
    end = start + int(num_feature_tokens)
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


def check_image_spans(item: dict, num_feature_tokens: int, length: int) -> None:
    """Raise MmloomError (naming the sample) when one of a several-image sample's image runs (its
    `vision` entries) is not `num_feature_tokens` long, does not fit the row, is marked as padding
    or is supervised."""
    for entry in item.get("vision") or []:
        if int(entry["span"][1]) != int(num_feature_tokens):
            raise MmloomError(f"sample {item.get('index', '?')}: an image run of {entry['span'][1]} slots, but the model "
                              f"gives {num_feature_tokens} features per image")
    check_item_spans(item, "vision", length)


class LlavaCollator:
    """Collate `HDF5LlavaDataset` items into an HF-style batch.

    Returns a dict with
    - `input_ids` (B, T) long: the text ids; the image slots of samples with an image (their
      recorded `[image_start_idx, image_start_idx + num_feature_tokens)`) hold `image_token_id`;
    - `attention_mask` (B, T) long = 1 - key_padding_mask (text-only samples' slots are 0);
    - `labels` (B, T) long, HF convention (unshifted, -100 = ignore):
      `labels[t+1] = input_ids[t+1] if loss_mask[t] else -100`, `labels[0] = -100`;
    - `vision`: `{"pixel_values": (N_images, 3, H, W)}`, the images of the samples, row-major (a
      sample's images in placeholder order); absent when no sample has one (the batch format:
      `mmloom.model.batch`). A sample with several images (its `vision` entries, each
      `pixel_values` and `span`) has `image_token_id` in every span;
    - `image_counts`: per sample, its number of images;
    - `num_loss_tokens` int: number of labels != -100 (for token-level loss normalisation);
    - `has_image` (B,) bool; `slots`: per sample `(start, end)` of its slot run or None.
    With `trim=True`, trailing columns that are padding in every sample are dropped.
    `pad_token_id` is what packed rows are padded with (the ids of padding are never attended).
    """

    def __init__(self, image_token_id: int, pad_token_id: int, num_feature_tokens: int, trim: bool = False):
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.num_feature_tokens = int(num_feature_tokens)
        self.trim = trim

    def __call__(self, batch: list[dict]) -> dict:
        ids = torch.stack([b["text_input_ids"] for b in batch]).long()
        kpm = torch.stack([b["key_padding_mask"] for b in batch]).long()
        loss = torch.stack([b["loss_mask"] for b in batch]).long()
        has_image = torch.tensor([bool(b["has_image"]) for b in batch], dtype=torch.bool)

        attention_mask = 1 - kpm
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 1:] = torch.where(loss[:, :-1] == 1, ids[:, 1:], IGNORE_INDEX)
        slots = [check_slots(b, self.num_feature_tokens) for b in batch]
        input_ids = ids.clone()
        per_sample: list[list[torch.Tensor]] = []  # each sample's images, in placeholder order
        for i, (item, span) in enumerate(zip(batch, slots, strict=True)):
            if item.get("vision"):  # several images: one run of slots per image
                check_image_spans(item, self.num_feature_tokens, ids.shape[1])
                for entry in item["vision"]:
                    start, n = entry["span"]
                    input_ids[i, start : start + n] = self.image_token_id
                per_sample.append([entry["pixel_values"] for entry in item["vision"]])
            elif span is not None and bool(has_image[i]):
                input_ids[i, span[0] : span[1]] = self.image_token_id
                per_sample.append([item["image_data"]])
            else:
                per_sample.append([])

        if self.trim:
            used = attention_mask.any(dim=0).nonzero()
            length = int(used.max()) + 1 if used.numel() else 1
            input_ids, attention_mask, labels = (
                input_ids[:, :length],
                attention_mask[:, :length],
                labels[:, :length],
            )

        images = [image for sample in per_sample for image in sample]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "has_image": has_image,
            "slots": slots,
            "image_counts": [len(sample) for sample in per_sample],
        }
        if images:
            out["vision"] = {"pixel_values": torch.stack(images)}
        return out


def sample_images(batch: dict) -> list[torch.Tensor]:
    """Per sample of a `LlavaCollator` batch, its rows of `vision.pixel_values` (`(k, 3, H, W)`, k its
    `image_counts`: 0 for a sample without images)."""
    counts = batch["image_counts"]
    if "vision" not in batch:
        return [torch.zeros(0) for _ in counts]
    return list(torch.split(batch["vision"]["pixel_values"], counts))


class TrainCollator:
    """`LlavaCollator`, then: every text-only sample gets a dummy (zero) image in its masked slots.

    This is the seed's behaviour ("text-only samples still get the image slots, masked out through
    key_padding_mask and fed a dummy image"): the vision encoder and projector then run on every
    micro-batch of every rank, which DDP and FSDP need (same collectives and the same parameters
    used on every rank). The dummy features sit in positions nothing attends to and nothing is
    supervised at, so they change neither the loss nor any gradient. When no sample of the
    micro-batch has slots (text-only samples built with `text_only_slots: false`), one extra row of
    `num_feature_tokens` image positions carries the dummy image; it has no label and is not counted.
    """

    def __init__(self, image_token_id: int, pad_token_id: int, num_feature_tokens: int, dummy_images: bool = True,
                 trim: bool = True):
        # trim: drop all-padding tail columns
        self.base = LlavaCollator(image_token_id, pad_token_id, num_feature_tokens, trim=trim)
        self.image_token_id = image_token_id
        self.num_feature_tokens = num_feature_tokens
        self.dummy_images = dummy_images

    def __call__(self, items: list[dict]) -> dict:
        batch = self.base(items)
        batch["num_attended_tokens"] = int(batch["attention_mask"].sum())
        batch["num_samples"] = len(items)
        batch["num_images"] = sum(batch["image_counts"])
        if not self.dummy_images or bool(batch["has_image"].all()):
            return batch
        input_ids = batch["input_ids"].clone()
        use = batch["has_image"].clone()
        for i, span in enumerate(batch["slots"]):
            if use[i] or span is None or span[1] > input_ids.shape[1]:
                continue
            input_ids[i, span[0] : span[1]] = self.image_token_id  # the text-only sample's masked slots
            use[i] = True
        if bool(use.any()):
            own = sample_images(batch)
            batch["input_ids"] = input_ids
            batch["vision"] = {"pixel_values": torch.cat([
                own[i] if bool(batch["has_image"][i]) else item["image_data"][None]
                for i, item in enumerate(items) if bool(use[i])])}
        elif items:
            self._add_dummy_row(batch, items[0]["image_data"])
        return batch

    def _add_dummy_row(self, batch: dict, image_like: torch.Tensor) -> None:
        """Append a row of image positions fed a zero image (no labels, counted nowhere)."""
        n = self.num_feature_tokens
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        width = max(ids.shape[1], n)
        pad = width - ids.shape[1]
        if pad:
            ids = torch.nn.functional.pad(ids, (0, pad), value=self.base.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, pad), value=0)
            labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
        row = torch.full((1, width), self.base.pad_token_id, dtype=ids.dtype)
        row[0, :n] = self.image_token_id
        row_mask = torch.zeros((1, width), dtype=mask.dtype)
        row_mask[0, :n] = 1
        batch["input_ids"] = torch.cat([ids, row])
        batch["attention_mask"] = torch.cat([mask, row_mask])
        batch["labels"] = torch.cat([labels, torch.full((1, width), IGNORE_INDEX, dtype=labels.dtype)])
        batch["vision"] = {"pixel_values": torch.zeros_like(image_like)[None]}


class PackedCollator:
    """Pack a micro-batch of `HDF5LlavaDataset` items, whole, into one padding-free row.

    Each sample keeps its real tokens only (the masked image slots of a text-only sample in the
    seed's layout are dropped; the tokens after them keep their original positions, so the sample
    computes exactly what it computes unpacked), its own `position_ids` (0, 1, ... as if it ran
    alone) and -100 as the label of its first token (no token predicts across a boundary). The
    sample boundaries go with the batch (`mmloom.model.attention.varlen_kwargs`), for attention
    that never crosses them and never builds a (T, T) mask: `mmloom_sdpa_varlen` (SDPA per
    sample) or flash_attention_2/3 (varlen). Which samples share a micro-batch (at even token
    counts over the step) is `mmloom.data.sampling.PackedStepSampler`'s business.

    `collator` is the run's `TrainCollator`: its `LlavaCollator` does the per-sample work (labels,
    image slots), its `dummy_images` / `num_feature_tokens` / `image_token_id` are honoured: a
    micro-batch without any real image gets one dummy (zero) image as an unsupervised segment of
    its own (no sample attends to it), so the vision encoder and projector run on every
    micro-batch (DDP / FSDP).

    Returns `input_ids`, `labels` (HF convention), `position_ids`, all (1, N) with N the tokens of
    all segments; `attention_mask` None; `cu_seq_lens_q` / `cu_seq_lens_k` (S + 1,) int32 and
    `max_length_q` / `max_length_k` int over the S segments (the samples in order, then the dummy
    segment if any); `vision` (`pixel_values` in segment order, matching the placeholder order); the
    counters `TrainCollator` gives (`num_loss_tokens`, `num_attended_tokens` = real tokens of the
    samples, `num_samples`, `num_images` = real images (several per sample counted each), `has_image`);
    and `spans`: per input sample `(0, start, end)` in the row.
    """

    def __init__(self, collator):
        self.collator = collator

    def segments(self, items: list[dict]) -> tuple[list[dict], dict]:
        """Per sample: its real tokens (`ids`, `labels`, `pos`) and its images (`(k, 3, H, W)`, or None).
        Raises MmloomError naming the sample when one has no attended token."""
        base = self.collator.base
        batch = base(items)
        images = sample_images(batch)
        out = []
        for i in range(len(items)):
            keep = batch["attention_mask"][i].nonzero().flatten()
            if not keep.numel():
                raise MmloomError(f"sample {items[i].get('index', '?')} has no attended token: nothing to pack")
            labels = batch["labels"][i, keep].clone()
            labels[0] = IGNORE_INDEX  # the previous segment's last token must not predict this one
            gap = torch.ones_like(keep, dtype=torch.bool)
            gap[1:] = keep[1:] - keep[:-1] != 1
            labels[gap] = IGNORE_INDEX  # a token whose predecessor was dropped (masked slots)
            image = images[i] if batch["image_counts"][i] else None
            out.append({"ids": batch["input_ids"][i, keep], "labels": labels, "pos": keep, "image": image})
        return out, batch

    def __call__(self, items: list[dict]) -> dict:
        segs, batch = self.segments(items)
        n_real = len(segs)
        has_image = batch["has_image"]
        c = self.collator
        if getattr(c, "dummy_images", False) and not bool(has_image.any()) and items:
            n = int(c.num_feature_tokens)
            segs.append({
                "ids": torch.full((n,), int(c.image_token_id), dtype=torch.long),
                "labels": torch.full((n,), IGNORE_INDEX, dtype=torch.long),
                "pos": torch.arange(n),
                "image": torch.zeros_like(items[0]["image_data"])[None],
            })
        lengths = [int(s["ids"].numel()) for s in segs]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        spans = [(0, end - n, end) for n, end in zip(lengths[:n_real], ends, strict=False)]
        images = [s["image"] for s in segs if s["image"] is not None]
        labels = torch.cat([s["labels"] for s in segs])[None]
        out = {
            "input_ids": torch.cat([s["ids"] for s in segs])[None],
            "labels": labels,
            "position_ids": torch.cat([s["pos"] for s in segs])[None],
            "attention_mask": None,
            **varlen_kwargs(lengths),
            "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "num_attended_tokens": sum(lengths[:n_real]),
            "num_samples": n_real,
            "num_images": sum(batch["image_counts"]),
            "has_image": has_image,
            "spans": spans,
        }
        if images:
            out["vision"] = {"pixel_values": torch.cat(images)}
        return out


class FeatureCollator:
    """Wraps a collator of image items (`TrainCollator`, ...): the items' `module_features` stand in
    for `image_data`, and the batch's `vision` carries `module_features` (N, L, D) instead of
    `pixel_values`."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):  # num_feature_tokens, pad ids, ... of the wrapped collator
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, items: list[dict]) -> dict:
        items = [{**item, "image_data": item["module_features"]} for item in items]
        batch = self.base(items)
        if "vision" in batch:
            batch["vision"] = {"module_features": batch["vision"]["pixel_values"]}
        return batch


def check_item_spans(item: dict, modality: str, length: int) -> None:
    """Raise MmloomError (naming the sample) when an item's slots run past the row, are marked as
    padding, or are supervised."""
    kpm, loss = item["key_padding_mask"], item["loss_mask"]
    for media in item.get(modality, []):
        start, n = media["span"]
        end = start + n
        index = item.get("index", "?")
        if start < 0 or n < 1 or end > length:
            raise MmloomError(f"sample {index}: {modality} slots {start}..{end - 1} do not fit its {length} positions")
        if bool(kpm[start:end].any()):
            raise MmloomError(f"sample {index}: some of its {modality} slots {start}..{end - 1} are marked as padding")
        if bool(loss[max(start - 1, 0): end - 1].any()):
            raise MmloomError(f"sample {index}: loss on its {modality} slots {start}..{end - 1}")


class MediaCollator:
    """Wraps `TrainCollator` or `PackedCollator` (or another `MediaCollator`) and adds one modality's
    items (`HDF5LlavaDataset` items under `modality`, each its encoder inputs and `span`): it writes
    the placeholder id `token_id` into every item's slots before the wrapped collator lays the rows
    out, then concatenates the items' inputs (each with its leading dimension: one row per image or
    audio clip, one per frame of a video clip, with its `video_frames` (1,)) in the order their
    placeholders appear in the rows (row-major, packed rows in segment order: the order the model
    fills them) as `batch[modality]`, and counts the real items in `num_<modality>`.

    `dummy` (`MediaItemReader.dummy()`, or None for no dummy) is the item given to micro-batches
    without any, in an extra sample whose tokens carry no label and are counted nowhere, so that
    the modality's encoder and projector run on every micro-batch of every rank (DDP and FSDP need
    the same parameters used everywhere), as `TrainCollator` does for images.
    """

    def __init__(self, base, modality: str, token_id: int, dummy: dict[str, Any] | None = None):
        self.base = base
        self.modality = modality
        self.token_id = int(token_id)
        self.dummy = dummy

    def __getattr__(self, name):  # settings of the wrapped collator
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _mark(self, item: dict) -> dict:
        media = item.get(self.modality) or []
        if not media:
            return item
        ids = item["text_input_ids"].clone()
        check_item_spans(item, self.modality, ids.shape[0])
        for entry in media:
            start, n = entry["span"]
            ids[start:start + n] = self.token_id
        return {**item, "text_input_ids": ids}

    def _dummy_item(self, like: dict) -> dict:
        length = like["text_input_ids"].shape[0]
        n = int(self.dummy["span"][1])
        if n > length:
            raise MmloomError(f"the dummy {self.modality} item needs {n} positions, more than the rows' {length}")
        ids = torch.zeros_like(like["text_input_ids"])
        ids[:n] = self.token_id
        kpm = torch.ones_like(like["key_padding_mask"])
        kpm[:n] = 0
        image = like.get("image_data")
        return {
            "text_input_ids": ids, "key_padding_mask": kpm, "loss_mask": torch.zeros_like(like["loss_mask"]),
            "labels": torch.zeros_like(like["labels"]), "has_image": False, "image_start_idx": -1, "index": -1,
            "image_data": None if image is None else torch.zeros_like(image), self.modality: [self.dummy],
        }

    def __call__(self, items: list[dict]) -> dict:
        items = [self._mark(item) for item in items]
        n_real = len(items)
        num_items = sum(len(item.get(self.modality) or []) for item in items)
        if num_items == 0 and self.dummy is not None and items:
            items = [*items, self._dummy_item(items[0])]
        batch = self.base(items)
        order = list(range(len(items)))
        spans = batch.get("spans")
        if spans is not None:  # packed rows: samples in (row, start) order
            order.sort(key=lambda k: (spans[k][0], spans[k][1]) if spans[k] is not None else (1 << 30, k))
        media = [entry for k in order for entry in (items[k].get(self.modality) or [])]
        if len(items) > n_real:  # the dummy sample is nobody's: take it out of the counters
            dummy_tokens = int(self.dummy["span"][1])
            batch["num_attended_tokens"] = batch.get("num_attended_tokens", dummy_tokens) - dummy_tokens
            batch["num_samples"] = n_real
            for key in ("has_image", "slots", "spans", "image_counts"):
                if batch.get(key) is not None:
                    batch[key] = batch[key][:n_real]
        if media:
            batch[self.modality] = {key: torch.cat([entry[key] for entry in media])
                                    for key in media[0] if key != "span"}
        batch[f"num_{self.modality}"] = num_items
        return batch


def collate_jsonl(batch: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of `JsonlLlavaDataset` items: input_ids / labels (-100) / attention_mask, and
    `vision` = `{"pixel_values": (N_images, 3, H, W)}` (absent without images)."""
    padded = pad_rows([(b["input_ids"], b["labels"]) for b in batch], pad_token_id, padding_side)
    input_ids, attention_mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
    images = [b["pixel_values"] for b in batch if b.get("pixel_values") is not None]
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
    }
    if images:
        out["vision"] = {"pixel_values": torch.cat(images)}
    return out
