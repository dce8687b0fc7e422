"""Training from cached encoder features (`train_input.use_cached_features: true`).

The features come from `mmloom data cache-features` (see `mmloom.data.feature_cache`). The
dataset returns them instead of decoding images (no image I/O at all), the collator passes them
as `module_features`, and the trainer hands them to the model as
`vision={"module_features": ...}`: the projector, merge and LLM run, the frozen encoder does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mmloom.data.feature_cache import FEATURES, features_name, trainable_encoder_params
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.errors import MmloomError


class CachedFeatureDataset(HDF5LlavaDataset):
    """`HDF5LlavaDataset` whose items hold `module_features` (L, D) float16 instead of `image_data`.

    Text-only samples get zeros (the rows `cache-features` never writes), which the collator
    uses as the dummy image's features, like the dummy image of the image path.
    """

    def __init__(self, data_dir, cache_dir):
        super().__init__(data_dir, None, image_transform=None)
        self.cache_dir = Path(cache_dir)
        self.feature_files = [self.cache_dir / features_name(p) for p in self.files]
        missing = [p.name for p in self.feature_files if not p.is_file()]
        if missing:
            raise MmloomError(f"feature cache {self.cache_dir} lacks {', '.join(missing)}; run `mmloom data cache-features`")
        self._feature_handles: list | None = None
        self._feature_pid: int | None = None

    def _features(self):
        import h5py

        if self._feature_handles is None or self._feature_pid != os.getpid():
            self._feature_handles = [h5py.File(p, "r")[FEATURES] for p in self.feature_files]
            self._feature_pid = os.getpid()
        return self._feature_handles

    def __getstate__(self):
        state = super().__getstate__()
        state["_feature_handles"] = None
        state["_feature_pid"] = None
        return state

    def close(self) -> None:
        for d in getattr(self, "_feature_handles", None) or []:
            try:
                d.file.close()
            except Exception:  # noqa: BLE001
                pass
        self._feature_handles = None
        super().close()

    def _image(self, rel: str, index: int) -> torch.Tensor:  # the base class's image hook: features instead
        file_idx, local = self.locate(index)
        return torch.from_numpy(np.asarray(self._features()[file_idx][local]))

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["module_features"] = item.pop("image_data")
        return item


class FeatureCollator:
    """Wraps a collator of image items (`TrainCollator`, ...): the items' `module_features` stand in
    for `image_data`, and the batch carries `module_features` (N, L, D) instead of `pixel_values`."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):  # num_image_tokens, pad ids, ... of the wrapped collator
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, items: list[dict]) -> dict:
        items = [{**item, "image_data": item["module_features"]} for item in items]
        batch = self.base(items)
        batch["module_features"] = batch.pop("pixel_values", None)
        return batch


def check_cached_features(cfg, model, mode: str) -> None:
    """Refuse cached features that a run cannot use (trainable or unsupported encoder, missing or
    stale cache) for each input section the mode reads.

    Called on the unwrapped model before it moves to its device: the encoder weights it hashes are
    those the uncached run would use.
    """
    from mmloom.data.feature_cache import verify_feature_cache

    sections = {"train_input": ("train", "train_and_eval"), "eval_input": ("eval", "train_and_eval")}
    for name, modes in sections.items():
        section = getattr(cfg, name)
        if section is None or not section.use_cached_features or mode not in modes:
            continue
        trainable = trainable_encoder_params(model)
        if trainable and mode != "eval":  # the encoder changes during this run: its cache would go stale
            raise MmloomError(
                f"{name}.use_cached_features needs a frozen vision encoder, but model.freeze leaves "
                f"{len(trainable)} of its parameters trainable (e.g. vision_encoder.module.{trainable[0]}): cached "
                "features would not follow its updates. Add '^image_model' to model.freeze, or set "
                f"{name}.use_cached_features: false"
            )
        encoder = model.encoders["vision"]
        if encoder.preprocess_callback is not None or encoder.postprocess_projector_callback is not None:
            raise MmloomError(
                f"{name}.use_cached_features supports vision encoders whose only callback is the feature selection"
            )
        shape = (model.num_feature_tokens("vision"), encoder.feature_dim())
        verify_feature_cache(section, model, cfg.model.precision, feature_shape=shape)