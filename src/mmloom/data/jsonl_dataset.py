"""LLaVA jsonl records tokenized on the fly (no HDF5 step), for quick experiments.

Records are templated and tokenized once at construction with the same `encode_record` as
`mmloom data build`; bad records are skipped and counted in `skipped` (or raise with
`strict=True`). Items are `{input_ids, labels, pixel_values (N_images, 3, H, W) or None}`; each
`<image>` is expanded into `num_feature_tokens` copies of `image_token_id` (labels -100 there), in
place (several images per record, LLaVA-OneVision style, keep their placeholders where they are).
Text-only records have no image tokens (HF style, no dummy image).
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmloom.data.encode import EncodedSample, MediaSlots, encode_record, parse_record_line, record_paths
from mmloom.data.records_io import SkipRecord, iter_jsonl_lines
from mmloom.errors import MmloomError
from mmloom.processing.image import ImageSpec
from mmloom.processing.templates import get_template
from mmloom.processing.tokenizer import token_id


class JsonlLlavaDataset(Dataset):
    def __init__(
        self,
        jsonl_path,
        image_dir,
        tokenizer,
        template,
        num_feature_tokens: int,
        image_token_id: int,
        image_transform,
        max_length: int,
        *,
        image_token: str = "<image>",
        strict: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        self.jsonl_path = Path(jsonl_path)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.image_transform = image_transform
        self.dtype = dtype
        if not self.jsonl_path.is_file():
            raise MmloomError(f"jsonl file not found: {self.jsonl_path}")
        if isinstance(template, str):
            template = get_template(template)
        marker_id = token_id(tokenizer, image_token)
        if marker_id is None:
            raise MmloomError(f"the tokenizer has no '{image_token}' token; add it as a special token first")
        # the image slots hold image_token_id (the model's placeholder id), found by the tokenizer as marker_id
        self.spec = ImageSpec(placeholder=image_token, token_id=marker_id, folder=self.image_dir,
                              num_tokens=num_feature_tokens, transform=image_transform, dtype=dtype)
        self.samples: list[EncodedSample] = []
        self.skipped: collections.Counter = collections.Counter()
        for lineno, line in iter_jsonl_lines(self.jsonl_path):
            try:
                if isinstance(line, SkipRecord):  # not UTF-8
                    raise line
                record = parse_record_line(line)
                images = record_paths(record, self.spec.record_key)
                sample = encode_record(
                    record,
                    tokenizer=tokenizer,
                    template=template,
                    media=[MediaSlots(self.spec, images, [num_feature_tokens] * len(images))],
                    slot_fill_id=image_token_id,
                    max_length=max_length,
                    text_only_slots=False,
                )
            except SkipRecord as skip:
                if strict:
                    raise MmloomError(f"{self.jsonl_path}:{lineno}: {skip.reason} ({skip})") from None
                self.skipped[skip.reason] += 1
                continue
            self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        images = []
        for rel in s.images:
            path = self.spec.path(rel)
            try:
                images.append(self.spec.load(path))
            except MmloomError as exc:
                raise MmloomError(f"sample {index}: cannot load image {path}: {exc}") from None
        pixel_values = self.spec.encoder_inputs(images)["pixel_values"] if images else None
        return {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }


