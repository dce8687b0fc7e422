"""Map-style dataset over the `.h5` files written by `mmloom data build` (the Cerebras layout).

Each item holds the seed's five tensors plus where its image slots are:

- `image_data` (3, H, W) in `dtype` (zeros for text-only samples: the dummy image),
- `text_input_ids`, `loss_mask`, `labels`, `key_padding_mask` (MSL,) int32 (rows 0, 1, 2, 3),
- `has_image` bool (`img_path` is not `b"None"` / empty),
- `image_start_idx` int: the first of the sample's `num_patches` slots, -1 = none (the file's
  `image_start_idx`, or the dataset's one start index for Cerebras files: `mmloom.data.h5_format`),
- `index` int: the sample's index in the dataset (for error messages),
- `vision` (samples of files with image items, `h5_format`: data with several images per sample):
  every image of the sample in placeholder order, each `{"pixel_values": (3, H, W), "span": (start,
  length)}`; `image_data` is then the first of them,
- per modality of `media_readers` (data with items beyond its images, `modalities` of
  data_params.json): its items in placeholder order under the modality's name, each its encoder
  inputs plus `"span": (start, length)` (`mmloom.data.media_items.MediaItemReader`).

Without an image transform (`image_transform=None`, data without images), `image_data` is None.

The h5py handles are opened lazily, once per process (they are None after construction and
after pickling), so the dataset works with `DataLoader(num_workers > 0)`.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmloom.data.h5_format import (
    LazyH5Files,
    check_data_files,
    check_h5_file,
    decode_img_path,
    read_data_params,
    read_image_starts,
    read_item_paths,
    read_items,
    slot_layout,
    unfinished_build,
)
from mmloom.errors import MmloomError
from mmloom.processing.image import ImageSpec


class HDF5LlavaDataset(Dataset):
    """The samples of every `.h5` file of `data_dir` (sorted by name), images read from
    `img_data_dir` and turned into tensors by `image_transform` (`self.images`: their `ImageSpec`),
    the other modalities' items by `media_readers` (modality -> `MediaItemReader`).

    The folder is checked once, here: each file's structure (`h5_format.check_h5_file`), one
    sequence length for all, and the files against `data_params.json` (`h5_format.check_data_files`:
    a build that did not finish, files added, removed or replaced). Each item's token ids are
    checked against the data's vocabulary (`post-process.vocab_size`) when it is read.

    Raises MmloomError when the folder, its `.h5` files or its `data_params.json` are missing,
    unreadable, damaged or do not match (naming the file and the field).
    """

    h5: LazyH5Files | None = None  # class default: __del__ works even if __init__ failed early

    def __init__(self, data_dir, img_data_dir, image_transform, dtype: torch.dtype = torch.float32,
                 media_readers: dict | None = None):
        import h5py

        self.data_dir = Path(data_dir)
        self.img_data_dir = Path(img_data_dir) if img_data_dir is not None else None
        self.image_transform = image_transform
        self.dtype = dtype
        self.media_readers = dict(media_readers or {})
        if not self.data_dir.is_dir():
            raise MmloomError(f"HDF5 data folder not found: {self.data_dir}")
        self.files = sorted(p for p in self.data_dir.iterdir() if p.suffix == ".h5" and p.is_file())
        if not self.files:
            raise MmloomError(f"no .h5 files in {self.data_dir}")
        self.params = read_data_params(self.data_dir, required=False)
        self.num_patches = slot_layout(self.params)[1]
        budget = (self.params.get("dataset") or {}).get("max_image_pixels")  # the build's pixel budget
        self.max_image_pixels = budget if isinstance(budget, int) and budget > 0 else None
        self.images = ImageSpec(folder=self.img_data_dir, transform=image_transform, max_pixels=self.max_image_pixels,
                                dtype=dtype)
        post = self.params.get("post-process") or {}
        vocab = post.get("vocab_size")
        placeholders = [post.get("image_token_id"),
                        *((recorded or {}).get("token_id") for recorded in (self.params.get("modalities") or {}).values())]
        self.vocab_size = (max([int(vocab), *(int(i) + 1 for i in placeholders if isinstance(i, int))])
                           if isinstance(vocab, int) and vocab > 0 else None)  # ids must stay below it
        counts, starts = [], []
        lengths: dict[int, Path] = {}
        # per modality, per file: (offsets, spans) of its items, None for a file without them
        self.items: dict[str, list[tuple[np.ndarray, np.ndarray] | None]] = {m: [] for m in self.media_readers}
        self.image_items: list[tuple[np.ndarray, np.ndarray] | None] = []  # the same, of images (several per sample)
        for path in self.files:
            try:
                with h5py.File(path, "r") as f:
                    if (unfinished := unfinished_build(self.data_dir, f, self.params)) is not None:
                        raise unfinished
                    n, msl = check_h5_file(f, path, self.params)
                    counts.append(n)
                    lengths.setdefault(msl, path)
                    starts.append(read_image_starts(f, self.params, path))
                    self.image_items.append(read_items(f, ImageSpec.noun, path))
                    for modality, reader in self.media_readers.items():
                        self.items[modality].append(read_items(f, reader.spec.noun, path))
            except (OSError, KeyError) as exc:
                raise MmloomError(f"{path}: not an HDF5 LLaVA data file ({exc})") from None
        if len(lengths) > 1:
            (a, first), (b, second) = sorted(lengths.items())[:2]
            raise MmloomError(f"{self.data_dir}: the files have different sequence lengths ({first.name}: {a}, "
                              f"{second.name}: {b}); one build writes one max_sequence_length")
        self.max_sequence_length = next(iter(lengths))
        check_data_files(self.data_dir, self.params, {p.name: c for p, c in zip(self.files, counts, strict=True)})
        self.counts = counts
        self.offsets = np.cumsum([0, *counts]).tolist()
        self.image_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self.h5 = LazyH5Files(self.files)

    @property
    def several_images(self) -> bool:
        """Whether some sample holds several images (a file has image items)."""
        return any(located is not None for located in self.image_items)

    def close(self) -> None:
        """Close the open .h5 handles (they reopen on the next item)."""
        if self.h5 is not None:
            self.h5.close()

    def __del__(self):
        self.close()

    # -- Dataset ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file index, row in that file) of dataset `index` (negative counts from the end);
        raises IndexError outside the dataset."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        file_idx = bisect.bisect_right(self.offsets, index) - 1
        return file_idx, index - self.offsets[file_idx]

    def _image(self, rel: str | None, index: int) -> torch.Tensor | None:
        if self.image_transform is None:
            if rel is not None:
                raise MmloomError(f"sample {index} has an image but this dataset was opened without an image transform")
            return None
        if rel is None:  # the dummy image of a text-only sample
            return self.images.dummy()[0]["pixel_values"][0]
        path = self.images.path(rel)
        try:
            image = self.images.load(path)
        except MmloomError as exc:
            raise MmloomError(f"sample {index}: cannot load image {path}: {exc}") from None
        return self.images.encoder_inputs([image])["pixel_values"][0]

    def _images(self, h, file_idx: int, local: int, rel: str | None, index: int) -> list[dict]:
        """The images of sample `local` of a file with image items, each its `pixel_values` and
        `span`; raises MmloomError when the items disagree with the file's `img_path` /
        `image_start_idx` (a damaged file)."""
        offsets, spans = self.image_items[file_idx]
        first, last = int(offsets[local]), int(offsets[local + 1])
        rels = read_item_paths(h, ImageSpec.noun, first, last)
        if (rels[0] if rels else None) != rel or (rels and int(spans[first][0]) != int(self.image_starts[index])):
            raise MmloomError(f"{self.files[file_idx]}: sample {local}: image_path / image_span disagree with img_path / "
                              "image_start_idx; the file is damaged: rebuild the data with `mmloom data build --overwrite`")
        return [{"pixel_values": self._image(path, index), "span": (int(spans[first + k][0]), int(spans[first + k][1]))}
                for k, path in enumerate(rels)]

    def _check_ids(self, rows: np.ndarray, file_idx: int, local: int) -> None:
        """Refuse a sample whose input ids or labels (rows 0 and 2) fall outside the data's vocabulary
        (a damaged or hand-edited file would otherwise fail deep in the embedding lookup)."""
        for row, field in ((0, "input ids (data row 0)"), (2, "labels (data row 2)")):
            low, high = int(rows[row].min()), int(rows[row].max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise MmloomError(f"{self.files[file_idx]}: sample {local}: {field} holds token id {bad}, outside the "
                                  f"vocabulary of {self.vocab_size} (data_params.json post-process.vocab_size); the "
                                  "file is damaged: rebuild the data with `mmloom data build --overwrite`")

    def __getitem__(self, index: int) -> dict:
        file_idx, local = self.locate(int(index))
        index = self.offsets[file_idx] + local
        h = self.h5[file_idx]
        rows = np.asarray(h["data"][local], dtype=np.int32)
        if self.vocab_size is not None:
            self._check_ids(rows, file_idx, local)
        rel = decode_img_path(h["img_path"][local])
        extra = {}
        image = None
        if self.image_items[file_idx] is not None:
            extra["vision"] = self._images(h, file_idx, local, rel, int(index))
            image = extra["vision"][0]["pixel_values"] if extra["vision"] else None
        for modality, reader in self.media_readers.items():
            if (located := self.items[modality][file_idx]) is None:
                continue
            offsets, spans = located
            first, last = int(offsets[local]), int(offsets[local + 1])
            extra[modality] = [reader.item(rel, spans[first + k], int(index))
                               for k, rel in enumerate(read_item_paths(h, reader.spec.noun, first, last))]
        return {
            "image_data": image if image is not None else self._image(rel, int(index)),
            "labels": torch.from_numpy(rows[2].copy()),
            "key_padding_mask": torch.from_numpy(rows[3].copy()),
            "text_input_ids": torch.from_numpy(rows[0].copy()),
            "loss_mask": torch.from_numpy(rows[1].copy()),
            "has_image": rel is not None,
            "image_start_idx": int(self.image_starts[index]),
            "index": int(index),
            **extra,
        }
