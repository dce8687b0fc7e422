"""The trainer's data wiring: which dataset, collator and sampler a training config asks for,
how its samples make the run's steps (`StepPlan`), the processor saved with a trained model, and
the feature cache of a config.

Everything here turns `train_input` / `eval_input` settings into objects of `mmloom.data`;
the data layer itself knows nothing about training configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmloom.data.build import special_ids
from mmloom.data.build_config import DatasetConfig, template_spec
from mmloom.data.collate import FeatureCollator, PackedCollator, TrainCollator
from mmloom.data.feature_cache import (
    CachedFeatureDataset,
    cache_dir_for,
    check_cacheable,
    verify_feature_cache,
    write_feature_cache,
)
from mmloom.data.h5_format import read_data_params
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.data.preference import PreferenceCollator, PreferencePairs
from mmloom.data.sampling import (
    EvalSampler,
    LengthGroupedStepSampler,
    PackedStepSampler,
    PaddedDataset,
    StepBatchSampler,
    sample_lengths,
    steps_per_epoch,
)
from mmloom.errors import MmloomError
from mmloom.model.attention import use_packed_attention
from mmloom.processing.image import ImageTransform
from mmloom.processing.processor import MultimodalProcessor
from mmloom.processing.tokenizer import load_tokenizer
from mmloom.training.config import InputConfig, ModelSection, TrainConfig, check_config_paths
from mmloom.training.distributed import DistContext
from mmloom.training.modalities import (
    check_data_media,
    data_media,
    media_processors,
    media_readers,
    vision_geometry,
    with_media,
)
from mmloom.training.model_loading import base_folder, model_at
from mmloom.training.preemption import ignore_stop_signals_in_worker
from mmloom.training.run_folder import RunFolder


def build_dataset(section: InputConfig, image_size: int, dtype=torch.float32):
    """The dataset of an input section: HDF5 samples with images transformed to `image_size`, or
    with cached encoder features (`use_cached_features`); with the items of other modalities when the data has
    some. `image_size` 0 (a model without a vision encoder) reads no image. The folder's
    data_params.json is required (a build that did not finish has none: refused here, first)."""
    params = read_data_params(section.data_dir)
    if section.use_cached_features:  # `mmloom data cache-features` output instead of images
        refuse_cached_several_images(section, params)
        return CachedFeatureDataset(section.data_dir, cache_dir_for(section))
    size = section.image_size or image_size
    transform = ImageTransform.from_config(section.transforms, size) if size else None
    return HDF5LlavaDataset(section.data_dir, section.img_data_dir, transform, dtype=dtype,
                            media_readers=media_readers(section, dtype, transform))


def refuse_cached_several_images(section: InputConfig, params: dict | None = None) -> None:
    """The feature cache holds one image's features per sample: refuse (MmloomError, one line) data
    with several images per sample (`image_patch_info.samples.several_images` of data_params.json)."""
    params = read_data_params(section.data_dir) if params is None else params
    several = (((params.get("image_patch_info") or {}).get("samples") or {}).get("several_images") or 0)
    clips = ((params.get("modalities") or {}).get("video") or {}).get("clips") or 0
    if clips:
        raise MmloomError(f"the data in {section.data_dir} has {clips} video clips, and the feature cache holds one "
                          "image per sample: train from the clips (use_cached_features: false)")
    if several:
        raise MmloomError(f"the data in {section.data_dir} has {several} samples with several images, and the feature "
                          "cache holds one image per sample: train from the images (use_cached_features: false)")


def make_loader(dataset, batch_sampler, collate, num_workers: int, seed: int = 0,
                pin_memory: bool | None = None) -> DataLoader:
    """The DataLoader of a sampler of micro-batches. `pin_memory` (None: when CUDA is available, as
    the trainer then runs there) puts batches in page-locked memory, so that `batch_to_device`'s
    non-blocking copies overlap with compute."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # A private generator: creating the iterator must not draw from the global RNG (exact resume).
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=bool(pin_memory),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals_in_worker if num_workers > 0 else None,
    )


def processor_for(section: InputConfig, image_size: int, model):
    """The MultimodalProcessor matching the training data (tokenizer, template, image transform),
    or None (with the reason) when the data's tokenizer cannot serve as one."""
    try:
        params = read_data_params(section.data_dir)
        dataset = DatasetConfig.model_validate(params["dataset"])
        tokenizer = load_tokenizer(params["processor"]["tokenizer_type"], what="processor.tokenizer_type")
        media = data_media(section.data_dir, section, params)
        # the stock tokenizer lacks the placeholders (<image>, ...): added in the order data build adds them
        special_ids(tokenizer, [dataset.image_token, *(spec.placeholder for spec in media)])
        processors = {}
        if "vision" in model.encoder_names:
            processors["vision"] = ImageTransform.from_config(section.transforms, section.image_size or image_size)
        processors |= media_processors(section, model, processors.get("vision"))
        style, options = template_spec(dataset, tokenizer)  # the template `mmloom data build` used
        placeholders = {spec.modality: spec.placeholder for spec in media}
        sampling = {spec.modality: spec.sampling for spec in media if spec.sampling is not None}
        return MultimodalProcessor.from_model(model, tokenizer, processors, template=style, template_options=options,
                                              placeholders=placeholders, sampling=sampling), None
    except (MmloomError, OSError, KeyError, ValueError) as err:
        return None, str(err)


def max_token_id(data_dir: str | Path, chunk: int = 4096) -> int:
    """The largest token id at an attended position of the HDF5 samples in `data_dir` (row 0 of
    `data`, where row 3, the inverted attention mask, is 0); -1 when there is none. Reads the files
    once (gzip, `chunk` samples at a time)."""
    import h5py

    files = sorted(Path(data_dir).glob("*.h5"))
    best = -1
    for path in files:
        with h5py.File(path, "r") as f:
            data = f["data"]
            for start in range(0, data.shape[0], chunk):
                rows = np.asarray(data[start : start + chunk])
                attended = rows[:, 0, :][rows[:, 3, :] == 0]
                if attended.size:
                    best = max(best, int(attended.max()))
    return best


def check_token_ids(model, data_dir: str | Path) -> None:
    """Refuse, at train (or eval) start, data whose token ids the model cannot take, in one line:

    - ids the LLM cannot embed: the data's tokenizer (`post-process.vocab_size` of
      `data_params.json`, the size before the placeholders were added; placeholders never
      appear in the data, its slots hold the pad id) is larger than the LLM's embedding matrix, and
      the data's largest id really reaches past it (read from the files: named with the LLM's
      vocabulary size). Without a recorded `vocab_size` (Cerebras' files) the files are read.
    - a vision placeholder id other than the one the data's tokenizer gives `<image>`
      (`post-process.image_token_id`): the model would train, but its processor could not be saved
      with it and `chat` / `generate` / exports would not find the images; a negative id is refused
      when the data records none.

    Raises MmloomError naming `data_dir`, the ids and the setting to change.
    """
    params = read_data_params(data_dir, required=False)
    post = params.get("post-process") or {}
    rows = int(model.get_input_embeddings().num_embeddings)
    data_vocab = post.get("vocab_size")
    if data_vocab is None or int(data_vocab) > rows:
        largest = max_token_id(data_dir)
        if largest >= rows:
            tokenizer = (params.get("processor") or {}).get("tokenizer_type", "?")
            raise MmloomError(
                f"the data in {data_dir} has token ids up to {largest} (tokenizer {tokenizer}, vocab_size "
                f"{data_vocab if data_vocab is not None else '?'}) but the LLM's vocabulary has {rows} tokens "
                "(embedding rows): train the LLM the data was tokenized for (model.text_model), or rebuild the "
                "data with this LLM's tokenizer"
            )
    vision_id = model.placeholder_token_ids.get("vision")
    data_image_id = post.get("image_token_id")
    if vision_id is None:
        return
    if data_image_id is not None and int(vision_id) != int(data_image_id):
        raise MmloomError(
            f"model.image_token_id is {vision_id} but the data in {data_dir} was built with '<image>' = "
            f"{data_image_id} (data_params.json post-process.image_token_id; the LLM has {rows} embedding rows): "
            f"set model.image_token_id to {data_image_id}"
        )
    if int(vision_id) < 0:
        raise MmloomError(f"model.image_token_id is {vision_id}: a token id is 0 or more")


def train_collator(collator, section: InputConfig, model):
    """The training collator for `train_input`: with `packing`, a `PackedCollator` (one padding-free
    row per micro-batch), and the model's language model switched to attention that reads packed
    rows (`mmloom.model.attention.use_packed_attention`: sdpa and eager become
    `mmloom_sdpa_varlen`, flash_attention_2/3 stay). Otherwise the collator as it is (rows
    trimmed to the micro-batch's longest sample). Raises MmloomError when the language model
    cannot take packed rows."""
    if section.packing:
        use_packed_attention(model.language_model)
        return PackedCollator(collator)
    return collator


def train_lengths(section: InputConfig, dataset) -> np.ndarray | None:
    """What the sampler of `train_input` needs to know of every sample: attended tokens with
    `packing`, the padded width with `group_by_length`, nothing otherwise (one pass over the
    data files at start; see `mmloom.data.sampling.sample_lengths`)."""
    if section.packing:
        return sample_lengths(dataset, attended_only=True)
    if section.group_by_length:
        return sample_lengths(dataset)
    return None


@dataclass
class StepPlan:
    """How the samples of `train_input` make a run's optimizer steps on its ranks.

    A step takes `global_batch` samples (`train_input.batch_size`): each of the `world_size`
    ranks runs `accum` micro-batches of `micro_batch` samples (fewer or more with packing, the
    same samples per step). Step `s` reads global batch `s % steps_per_epoch` of epoch
    `s // steps_per_epoch` (a permutation seeded by `seed` and the epoch when `shuffle`); with
    `drop_last` false the last global batch of an epoch is filled up with loss-free padding
    samples (`samples` then counts the dataset as padded). The run ends after `total_steps`."""

    samples: int
    global_batch: int
    micro_batch: int
    total_steps: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True

    @property
    def accum(self) -> int:
        """Micro-batches per rank and step (gradient accumulation)."""
        return self.global_batch // (self.world_size * self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.samples, self.global_batch, self.drop_last)

    @classmethod
    def for_run(cls, cfg: TrainConfig, samples: int, ctx: DistContext) -> StepPlan:
        """The plan of `cfg` (`train_input`, `runconfig.max_steps` or `num_epochs`) for a dataset of
        `samples` (padding wrapper included) on the ranks of `ctx`. Raises MmloomError when the batch
        size does not split into the ranks' micro-batches, or the data holds fewer samples than one
        global batch."""
        section, run = cfg.train_input, cfg.runconfig
        B, W = section.batch_size, ctx.world_size
        micro = section.micro_batch_size or max(1, B // W)
        if B % (W * micro):
            raise MmloomError(
                f"train_input.batch_size {B} must be a multiple of ranks x micro_batch_size ({W} x {micro})"
            )
        if samples < B:
            raise MmloomError(f"train_input: the dataset has {samples} samples, fewer than one global batch ({B})")
        plan = cls(samples, B, micro, 0, W, ctx.rank, run.seed, section.shuffle, section.drop_last)
        if run.max_steps is not None:
            plan.total_steps = run.max_steps
        else:
            plan.total_steps = max(1, int(math.ceil((run.num_epochs or 1.0) * plan.steps_per_epoch)))
        return plan


def step_sampler(section: InputConfig, dataset, lengths, plan: StepPlan, start_step: int = 0) -> StepBatchSampler:
    """The step sampler of `train_input` for steps `start_step .. plan.total_steps - 1`:
    `PackedStepSampler` with `packing` (micro-batches of even token counts, at most
    micro_batch_size x the data's MSL tokens each), `LengthGroupedStepSampler` with
    `group_by_length`, else `StepBatchSampler`; `lengths` from `train_lengths`."""
    args = (plan.samples, plan.global_batch, plan.world_size, plan.rank, plan.micro_batch, plan.seed, plan.shuffle,
            start_step, plan.total_steps)
    if section.packing:
        return PackedStepSampler(lengths, dataset.max_sequence_length, *args, drop_last=plan.drop_last)
    if section.group_by_length:
        return LengthGroupedStepSampler(lengths, *args, drop_last=plan.drop_last)
    return StepBatchSampler(*args, drop_last=plan.drop_last)


def base_collator(data_dir: str | Path, model_section: ModelSection, model) -> TrainCollator:
    """The `TrainCollator` of the data in `data_dir` for `model`: the pad id (`model.pad_token_id`,
    else the data's, else the LLM's) and the model's image slots, after checking that data and model
    agree (image start index, image slots per image, modalities, token ids). Raises MmloomError
    naming the setting to change otherwise."""
    params = read_data_params(data_dir)
    patch_info = params.get("image_patch_info") or {}
    num_feature_tokens = vision_geometry(model)[0]
    start = patch_info.get("image_patch_start_idx")
    if model_section.image_start_idx is not None and start is not None and start != model_section.image_start_idx:
        raise MmloomError(
            f"model.image_start_idx is {model_section.image_start_idx} but {data_dir}/data_params.json says the "
            f"image slots start at {start} (image_patch_info.image_patch_start_idx)"
        )
    data_slots = patch_info.get("num_patches")
    if data_slots is not None and data_slots != num_feature_tokens:
        raise MmloomError(
            f"image features and image tokens do not match: the data in {data_dir} has {data_slots} image "
            f"slots per image but the model gives {num_feature_tokens} features per image "
            "(check image_size, patch_size and image_feature_select_mode)"
        )
    pad = model_section.pad_token_id
    if pad is None:
        pad = (params.get("post-process") or {}).get("pad_id")
    if pad is None:
        pad = getattr(model.language_model.config, "pad_token_id", None)
    if pad is None:
        raise MmloomError("cannot tell the pad token id: set model.pad_token_id")
    check_data_media(model, data_dir)  # images or other media the model cannot read
    check_token_ids(model, data_dir)  # ids the LLM cannot embed, a placeholder id the data lacks
    image_token_id = model.placeholder_token_ids.get("vision", -1)
    return TrainCollator(image_token_id, int(pad), num_feature_tokens, dummy_images="vision" in model.encoder_names)


def make_collator(section: InputConfig, model_section: ModelSection, model, dataset, *, train: bool):
    """The collator of an input section, for training (`train`) or evaluation: `base_collator`,
    then with `train` packing (`train_collator`), cached encoder features instead of images
    (`use_cached_features`), and the items of the data's other modalities (with `train`, a dummy item
    keeps each of their encoders in every micro-batch, as DDP and FSDP need). Raises as `base_collator`."""
    collate = base_collator(section.data_dir, model_section, model)
    if train:
        collate = train_collator(collate, section, model)
    if section.use_cached_features:  # batches carry module_features instead of pixel_values
        collate = FeatureCollator(collate)
    return with_media(collate, model, getattr(dataset, "media_readers", {}), dummy=train)


@dataclass
class TrainData:
    """The training data of a run: `dataset` (padded with loss-free samples when
    `train_input.drop_last` is false), its collator, what the sampler needs to know of every
    sample (`train_lengths`) and how many real samples it holds. With a `preference` section the
    samples are pairs (`PreferencePairs`: prompt + chosen, prompt + rejected) and the collator puts
    both sequences of a micro-batch's pairs in one batch (`PreferenceCollator`)."""

    dataset: Any
    collate: Callable[[list[dict]], dict]
    lengths: np.ndarray | None
    samples: int

    @classmethod
    def for_run(cls, cfg: TrainConfig, model, ctx: DistContext) -> tuple[TrainData, StepPlan]:
        """The training data of `cfg` for `model` and the step plan it gives on the ranks of `ctx`.
        Raises MmloomError for data the model cannot take or a batch size that does not fit."""
        section = cfg.train_input
        dataset = build_dataset(section, vision_geometry(model)[1])
        if cfg.preference is not None:  # pairs: prompt + chosen, prompt + rejected
            dataset = PreferencePairs(dataset)
        samples = len(dataset)
        if not section.drop_last:  # the last step of an epoch is filled up with loss-free padding samples
            dataset = PaddedDataset(dataset)
        plan = StepPlan.for_run(cfg, len(dataset), ctx)
        collate = make_collator(section, cfg.model, model, dataset, train=True)
        if cfg.preference is not None:  # both sequences of each pair in the micro-batch's one forward
            collate = PreferenceCollator(collate)
        return cls(dataset, collate, train_lengths(section, dataset), samples), plan

    def loader(self, section: InputConfig, plan: StepPlan, start_step: int) -> DataLoader:
        """The micro-batches of steps `start_step ..` (see `step_sampler`)."""
        sampler = step_sampler(section, self.dataset, self.lengths, plan, start_step)
        return make_loader(self.dataset, sampler, self.collate, section.num_workers, plan.seed)


def eval_loader(cfg: TrainConfig, model, ctx: DistContext) -> DataLoader:
    """The micro-batches of `eval_input` on this rank: every sample once over the ranks (the last
    micro-batches padded with loss-free samples), collated for evaluation."""
    section = cfg.eval_input
    dataset = PaddedDataset(build_dataset(section, vision_geometry(model)[1]))
    micro = section.micro_batch_size or max(1, section.batch_size // ctx.world_size)
    sampler = EvalSampler(len(dataset), ctx.world_size, ctx.rank, micro)
    collate = make_collator(section, cfg.model, model, dataset, train=False)
    return make_loader(dataset, sampler, collate, section.num_workers, cfg.runconfig.seed)


def check_cached_features(cfg, model, mode: str) -> None:
    """Refuse cached features that a run cannot use (trainable or unsupported encoder, missing or
    stale cache) for each input section the mode reads.

    Called on the unwrapped model before it moves to its device: the encoder weights it hashes are
    those the uncached run would use.
    """
    sections = {"train_input": ("train", "train_and_eval"), "eval_input": ("eval", "train_and_eval")}
    for name, modes in sections.items():
        section = getattr(cfg, name)
        if section is None or not section.use_cached_features or mode not in modes:
            continue
        if "vision" not in model.encoder_names:
            raise MmloomError(f"{name}.use_cached_features caches the vision encoder's features; this model has "
                              f"none (encoders: {model.encoder_names})")
        check_cacheable(model, allow_trainable=mode == "eval", setting=f"{name}.use_cached_features")
        encoder = model.encoders["vision"]
        shape = (model.num_feature_tokens("vision"), encoder.feature_dim())
        verify_feature_cache(section, model, cfg.model.precision, feature_shape=shape)


def cache_features(cfg, model_dir: str | Path | None = None, batch_size: int = 32, device: str | None = None,
                   num_workers: int | None = None, overwrite: bool = False, progress: bool | None = None) -> dict:
    """`mmloom data cache-features`: the feature cache of `cfg.train_input`, computed by the vision
    encoder the run would start with, over the images exactly as training reads them. Returns the
    summary of `write_feature_cache`; raises MmloomError for bad paths or a trainable encoder."""
    section = cfg.train_input
    if section is None:
        raise MmloomError("cache-features needs a config with a train_input section")
    check_config_paths(cfg, "train")
    if section.img_data_dir is not None and not Path(section.img_data_dir).is_dir():
        raise MmloomError(f"train_input.img_data_dir: path not found: {section.img_data_dir}")
    refuse_cached_several_images(section)
    # the model exactly as `mmloom train` starts it, with the newest checkpoint of `model_dir` (as a resumed run)
    latest = RunFolder(model_dir).latest_checkpoint() if model_dir is not None else None
    model, _ = model_at(cfg, latest, base_folder(cfg))
    image_size = int(section.image_size or getattr(model.encoders["vision"].config, "image_size", 0) or 0)
    dataset = build_dataset(section.model_copy(update={"use_cached_features": False}), image_size)
    return write_feature_cache(
        model, dataset, section, cfg.model.precision, batch_size=batch_size, device=device,
        num_workers=section.num_workers if num_workers is None else num_workers, overwrite=overwrite,
        progress=progress,
    )
