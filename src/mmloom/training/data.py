"""Deterministic, resumable batching of the HDF5 LLaVA data for one rank.

Step `s` uses global batch `k = s % steps_per_epoch` of epoch `s // steps_per_epoch` (a seeded
permutation per epoch when shuffling). Rank `r` takes its contiguous share of that global batch
and splits it into micro-batches. The position of a run is thus just its step count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from mmloom.data.h5_format import read_data_params
from mmloom.errors import MmloomError
from mmloom.training.config import InputConfig


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank, steps `start_step .. total_steps - 1`."""

    def __init__(self, n: int, global_batch: int, world_size: int, rank: int, micro_batch: int, seed: int,
                 shuffle: bool, start_step: int, total_steps: int):
        self.n, self.global_batch, self.world_size, self.rank = n, global_batch, world_size, rank
        self.micro_batch, self.seed, self.shuffle = micro_batch, seed, shuffle
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = n // global_batch
        self.per_rank = global_batch // world_size
        if self.steps_per_epoch < 1:
            raise MmloomError(f"the dataset has {n} samples, fewer than one global batch ({global_batch})")

    def global_indices(self, step: int) -> list[int]:
        """All ranks' indices for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, epoch, self.seed, self.shuffle)
        return order[k * self.global_batch : (k + 1) * self.global_batch]

    def step_indices(self, step: int) -> list[int]:
        """This rank's indices for optimizer step `step` (0-based)."""
        batch = self.global_indices(step)
        return batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            indices = self.step_indices(step)
            for i in range(0, len(indices), self.micro_batch):
                yield indices[i : i + self.micro_batch]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * (self.per_rank // self.micro_batch)


class EvalSampler(Sampler[list[int]]):
    """All eval samples, strided over ranks; every rank gets the same number of batches
    (missing slots are filled with index -1, which the collator turns into an unsupervised sample)."""

    def __init__(self, n: int, world_size: int, rank: int, micro_batch: int):
        self.n, self.world_size, self.rank, self.micro_batch = n, world_size, rank, micro_batch
        per_rank = -(-n // world_size)
        self.batches = -(-per_rank // micro_batch)
        own = list(range(rank, n, world_size))
        own += [-1] * (self.batches * micro_batch - len(own))
        self.indices = own

    def __iter__(self):
        for b in range(self.batches):
            yield self.indices[b * self.micro_batch : (b + 1) * self.micro_batch]

    def __len__(self) -> int:
        return self.batches


class PaddedDataset(torch.utils.data.Dataset):
    """Index -1 gives a copy of sample 0 with no supervised token (eval padding)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index >= 0:
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["loss_mask"] = torch.zeros_like(item["loss_mask"])
        return item


class TrainCollator:
    """`LlavaCollator`, then: every text-only sample gets a dummy (zero) image in its masked slots.

    This is the seed's behaviour ("text-only samples still get the image slots, masked out through
    key_padding_mask and fed a dummy image"): the vision encoder and projector then run on every
    micro-batch of every rank, which DDP and FSDP need (same collectives and the same parameters
    used on every rank). The dummy features sit in positions nothing attends to and nothing is
    supervised at, so they change neither the loss nor any gradient.
    """

    def __init__(self, image_token_id: int, pad_token_id: int, num_image_tokens: int, dummy_images: bool = True,
                 trim: bool = True):
        from mmloom.data.collate import LlavaCollator

        # trim: drop all-padding tail columns
        self.base = LlavaCollator(image_token_id, pad_token_id, num_image_tokens, trim=trim)
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.dummy_images = dummy_images

    def __call__(self, items: list[dict]) -> dict:
        batch = self.base(items)
        batch["num_attended_tokens"] = int(batch["attention_mask"].sum())
        batch["num_samples"] = len(items)
        batch["num_images"] = int(batch["has_image"].sum())
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
            batch["input_ids"] = input_ids
            batch["pixel_values"] = torch.stack([item["image_data"] for item, u in zip(items, use.tolist(), strict=True) if u])
        return batch


def build_dataset(section: InputConfig, image_size: int, dtype=torch.float32):
    from mmloom.data.hdf5_dataset import HDF5LlavaDataset
    from mmloom.processing.image import ImageTransform

    if section.use_cached_features:  # `mmloom data cache-features` output instead of images
        from mmloom.data.feature_cache import cache_dir_for
        from mmloom.training.cached_features import CachedFeatureDataset

        return CachedFeatureDataset(section.data_dir, cache_dir_for(section))
    transform = ImageTransform.from_config(section.transforms, section.image_size or image_size)
    return HDF5LlavaDataset(section.data_dir, section.img_data_dir, transform, dtype=dtype)


def make_loader(dataset, batch_sampler, collate, num_workers: int, seed: int = 0) -> DataLoader:
    # A private generator: creating the iterator must not draw from the global RNG (exact resume).
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def processor_for(section: InputConfig, image_size: int, model):
    """The MultimodalProcessor matching the training data (tokenizer, template, image transform),
    or None (with the reason) when the data's tokenizer cannot serve as one."""
    from mmloom.data.build import special_ids
    from mmloom.data.build_config import DatasetConfig
    from mmloom.processing.image import ImageTransform
    from mmloom.processing.processor import MultimodalProcessor
    from mmloom.processing.tokenizer import load_tokenizer

    try:
        params = read_data_params(section.data_dir)
        dataset = DatasetConfig.model_validate(params["dataset"])
        tokenizer = load_tokenizer(params["processor"]["tokenizer_type"], what="processor.tokenizer_type")
        special_ids(tokenizer, dataset.image_token)  # the stock tokenizer lacks <image>: added as data build does
        transform = ImageTransform.from_config(section.transforms, section.image_size or image_size)
        style, options = dataset.system_prompt_style, {}
        if style == "plain":  # the same options `mmloom data build` used
            options = {"terminator": dataset.plain_terminator, "placeholder": dataset.image_token}
            if tokenizer.eos_token:
                options["eos"] = tokenizer.eos_token
        return MultimodalProcessor.from_model(model, tokenizer, {"vision": transform}, template=style,
                                              template_options=options), None
    except (MmloomError, OSError, KeyError, ValueError) as err:
        return None, str(err)
