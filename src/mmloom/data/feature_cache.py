"""`mmloom data cache-features`: precompute a frozen vision encoder's features for phase 1.

With the vision encoder frozen (LLaVA phase 1, and phase 2 too), its forward pass gives the same
features for an image at every epoch: it can run once. This module runs the encoder that a
training config builds (`mmloom.training.builder`, same seed, same start weights, same feature
selection, same image transform and precision) over every sample with an image, and stores what
the projector receives, `encode_module(...)[0]`, in float16:

    DATA_DIR/feature_cache/features-00000.h5    # one file per data-00000.h5
        features  [n, L, D] float16, chunks (1, L, D); text-only rows are never written (zeros)
        attrs     the signature below + the data file's identity

Training with `train_input.use_cached_features: true` then reads these instead of the images and
refuses a cache whose signature differs from what the run would compute (`verify_feature_cache`).
The signature holds a SHA-256 of the encoder weights, the encoder class, the feature selection
(layer, strategy), the image size, the canonical image transform steps and the precision; the
data identity holds the data file's name, row count and a SHA-256 of its image paths (a rebuilt
dataset makes the cache stale).

Each features file is written to a temporary sibling and renamed into place: an interrupted run
leaves complete files only, and a rerun skips the files that are already up to date.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmloom.data.h5_format import LazyH5Files, decode_img_path
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.devices import resolve_device
from mmloom.errors import MmloomError
from mmloom.files import atomic_file, write_json
from mmloom.model.adapters import base_module
from mmloom.model.callbacks import callback_to_dict
from mmloom.processing.image import ImageTransform
from mmloom.progress import rate_progress

FORMAT = "mmloom-feature-cache/1"
DEFAULT_CACHE_SUBDIR = "feature_cache"
FEATURES = "features"
SUMMARY = "feature_cache.json"

# signature key -> how to name it in a "stale cache" message
SIGNATURE_KEYS = {
    "encoder_class": "vision encoder class",
    "encoder_weights_sha256": "vision encoder weights (model.image_model / init_from / checkpoint_path / seed)",
    "feature_select": "feature selection (model.image_feature_select_layer_idx / image_feature_select_mode)",
    "image_size": "image size (train_input.image_size)",
    "transforms": "image transforms (train_input.transforms)",
    "precision": "precision (model.precision)",
}
DATA_KEYS = {
    "n_examples": "number of samples in the data file",
    "img_paths_sha256": "image paths of the data file (was the data rebuilt?)",
}


# ----------------------------------------------------------------------------------- naming
def cache_dir_for(section) -> Path:
    """`train_input.feature_cache_dir`, default DATA_DIR/feature_cache."""
    folder = getattr(section, "feature_cache_dir", None)
    return Path(folder) if folder else Path(section.data_dir) / DEFAULT_CACHE_SUBDIR


def features_name(data_file: str | Path) -> str:
    """`data-00000.h5` -> `features-00000.h5` (other names: `features-<stem>.h5`)."""
    stem = Path(data_file).stem
    return f"features-{stem.removeprefix('data-')}.h5"


# ------------------------------------------------------------------------------- signature
def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach()
            if hasattr(t, "full_tensor"):  # DTensor
                t = t.full_tensor()
            t = t.cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
            if t.numel():
                digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def image_size_for(section, model) -> int:
    """The image side a run uses: train_input.image_size, else the vision model's (as the trainer)."""
    return int(section.image_size or getattr(model.encoders["vision"].config, "image_size", 0) or 0)


def encoder_signature(model, section, precision: str) -> dict[str, Any]:
    """What the cached features depend on, besides the images themselves."""
    encoder = model.encoders["vision"]
    image_size = image_size_for(section, model)
    transform = ImageTransform.from_config(section.transforms, image_size)
    return {
        "encoder_class": type(base_module(encoder.module)).__name__,
        "encoder_weights_sha256": weights_sha256(encoder.module),
        "feature_select": json.dumps(callback_to_dict(encoder.postprocess_module_callback), sort_keys=True),
        "image_size": image_size,
        "transforms": json.dumps(transform.to_config(), sort_keys=True),
        "precision": precision,
    }


def data_identity(h5file) -> dict[str, Any]:
    """Row count and a hash of the image paths of an open data-*.h5 file."""
    paths = np.asarray(h5file["img_path"][:]).reshape(-1)
    digest = hashlib.sha256()
    for p in paths.tolist():
        digest.update(p if isinstance(p, bytes) else str(p).encode("utf-8"))
        digest.update(b"\0")
    return {"n_examples": int(h5file.attrs["n_examples"]), "img_paths_sha256": digest.hexdigest()}


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.tolist() if hasattr(value, "tolist") else value


def _differences(stored: dict, expected: dict, names: dict[str, str]) -> list[str]:
    out = []
    for key, label in names.items():
        have, want = stored.get(key), expected[key]
        if have is None or str(have) != str(want):
            if key.endswith("sha256"):
                have, want = (str(have)[:12] if have is not None else None), str(want)[:12]
            out.append(f"{label}: cache has {have!r}, this config gives {want!r}")
    return out


def verify_feature_cache(section, model, precision: str, feature_shape: tuple[int, int] | None = None) -> Path:
    """Raise MmloomError unless every data file of `section` has an up-to-date features file.

    Returns the cache folder. `feature_shape` (L, D) is also checked when given.
    """
    import h5py

    cache = cache_dir_for(section)
    data_dir = Path(section.data_dir)
    rerun = "run `mmloom data cache-features` with this training config"
    data_files = sorted(p for p in data_dir.iterdir() if p.suffix == ".h5" and p.is_file()) if data_dir.is_dir() else []
    if not data_files:
        raise MmloomError(f"train_input.use_cached_features: no .h5 data files in {data_dir}")
    if not cache.is_dir():
        raise MmloomError(f"train_input.use_cached_features: no feature cache at {cache}; {rerun} first")
    expected = encoder_signature(model, section, precision)
    for data_file in data_files:
        target = cache / features_name(data_file)
        if not target.is_file():
            raise MmloomError(
                f"train_input.use_cached_features: the feature cache {cache} has no {target.name} for "
                f"{data_file.name}; {rerun} first"
            )
        with h5py.File(data_file, "r") as f:
            ident = data_identity(f)
        try:
            with h5py.File(target, "r") as f:
                stored = {k: _attr(v) for k, v in f.attrs.items()}
                shape = tuple(f[FEATURES].shape)
        except (OSError, KeyError) as exc:
            raise MmloomError(f"train_input.use_cached_features: {target} is not a feature cache file ({exc})") from None
        if stored.get("format") != FORMAT:
            raise MmloomError(f"{target}: unknown feature cache format {stored.get('format')!r}; {rerun}")
        problems = _differences(stored, expected, SIGNATURE_KEYS) + _differences(stored, ident, DATA_KEYS)
        if not problems and shape[0] != ident["n_examples"]:
            problems.append(f"features rows: cache has {shape[0]}, the data file has {ident['n_examples']}")
        if not problems and feature_shape is not None and tuple(shape[1:]) != tuple(feature_shape):
            problems.append(f"feature shape: cache has {tuple(shape[1:])}, the model takes {tuple(feature_shape)}")
        if problems:
            raise MmloomError(
                f"train_input.use_cached_features: the feature cache {target} is stale ({'; '.join(problems)}); "
                f"{rerun} (it recomputes stale files), or set train_input.use_cached_features: false"
            )
    return cache


# ------------------------------------------------------------------------------ the model
def trainable_encoder_params(model) -> list[str]:
    """Names of the vision encoder module's parameters that require gradients ([] when frozen)."""
    return [n for n, p in model.encoders["vision"].module.named_parameters() if p.requires_grad]


def check_cacheable(model, allow_trainable: bool = False, setting: str = "cached features") -> None:
    """Raise MmloomError unless `model`'s vision encoder can be replaced by cached features: frozen
    (unless `allow_trainable`, e.g. for evaluation) and with no callback other than the feature
    selection. `setting` names what asked for the cache in the message."""
    encoder = model.encoders["vision"]
    trainable = trainable_encoder_params(model)
    if trainable and not allow_trainable:  # the encoder would change: its cache would go stale
        raise MmloomError(
            f"{setting}: a frozen vision encoder is needed, but {len(trainable)} of its parameters are trainable "
            f"(e.g. vision_encoder.module.{trainable[0]}): cached features would not follow its updates. "
            "Add '^image_model' to model.freeze"
        )
    for slot in ("preprocess_callback", "postprocess_projector_callback"):
        if getattr(encoder, slot) is not None:
            raise MmloomError(
                f"{setting}: the vision encoder has a {slot} ({getattr(encoder, slot)!r}); cached features "
                "support encoders whose only callback is the feature selection"
            )


# ---------------------------------------------------------------------------- the command
def _progress(enabled: bool):
    return rate_progress("[bold]caching features[/] {task.description}", "images", enabled, decimals=1,
                         remaining=True)


def _stack_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["image_data"] for item in items])


def _autocast(device: torch.device, precision: str):
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fresh(target: Path, signature: dict, ident: dict) -> bool:
    import h5py

    try:
        with h5py.File(target, "r") as f:
            stored = {k: _attr(v) for k, v in f.attrs.items()}
            rows = f[FEATURES].shape[0]
    except (OSError, KeyError):
        return False
    return (
        stored.get("format") == FORMAT
        and not _differences(stored, signature, SIGNATURE_KEYS)
        and not _differences(stored, ident, DATA_KEYS)
        and rows == ident["n_examples"]
    )


def write_feature_cache(
    model,
    dataset,
    section,
    precision: str,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write the feature cache of `section` (a `train_input`): `model`'s frozen vision encoder over
    every image of `dataset` (an `HDF5LlavaDataset` of `section.data_dir`, images as training reads
    them). Returns a summary (also written to feature_cache.json).

    Raises MmloomError when the encoder is not cacheable (trainable, or callbacks other than the
    feature selection) or its features overflow float16.
    """
    import h5py
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise MmloomError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    check_cacheable(model)
    encoder = model.encoders["vision"]
    signature = encoder_signature(model, section, precision)  # before moving: hashes CPU weights
    image_size = signature["image_size"]
    encoder.module.to(dev).eval()

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(dev, precision):
            out = encoder.encode_module(pixel_values=pixels.to(dev))[0]
        return out.detach().float()

    probe = encode(torch.zeros(1, 3, image_size, image_size))
    L, D = int(probe.shape[1]), int(probe.shape[2])

    cache = cache_dir_for(section)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(".features-*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)

    plan = []  # (file index, data file, target, identity, local rows with an image)
    for i, data_file in enumerate(dataset.files):
        with h5py.File(data_file, "r") as f:
            ident = data_identity(f)
            paths = np.asarray(f["img_path"][:]).reshape(-1)
        rows = [j for j, p in enumerate(paths.tolist()) if decode_img_path(p) is not None]
        target = cache / features_name(data_file)
        if not overwrite and _fresh(target, signature, ident):
            continue
        plan.append((i, data_file, target, ident, rows))

    workers = num_workers
    show = (sys.stdout.isatty() if progress is None else progress)
    total_images = sum(len(p[4]) for p in plan)
    t0 = time.perf_counter()
    with _progress(show) as bar:
        task = bar.add_task("", total=total_images)
        for file_idx, data_file, target, ident, rows in plan:
            bar.update(task, description=data_file.name)
            offset = dataset.offsets[file_idx]
            batches = [[offset + r for r in rows[k : k + batch_size]] for k in range(0, len(rows), batch_size)]
            with atomic_file(target) as tmp, h5py.File(tmp, "w") as out:
                feats = out.create_dataset(
                    FEATURES, shape=(ident["n_examples"], L, D), dtype=np.float16,
                    chunks=(1, L, D), fillvalue=0,
                )
                if batches:
                    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_stack_images,
                                        num_workers=workers)
                    for indices, pixels in zip(batches, loader, strict=True):
                        x = encode(pixels)
                        if tuple(x.shape[1:]) != (L, D):
                            raise MmloomError(f"{data_file.name}: encoder features {tuple(x.shape)}, expected (N, {L}, {D})")
                        x16 = x.to(torch.float16)
                        if not bool(torch.isfinite(x16).all()):
                            raise MmloomError(
                                f"{data_file.name}: the encoder features overflow float16 (max |x| = "
                                f"{float(x.abs().max()):.4g}); they cannot be cached in float16"
                            )
                        feats[[idx - offset for idx in indices]] = x16.cpu().numpy()
                        bar.advance(task, len(indices))
                out.attrs["format"] = FORMAT
                out.attrs["data_file"] = data_file.name
                for key, value in {**signature, **ident}.items():
                    out.attrs[key] = value
                out.attrs["n_images"] = len(rows)
                out.attrs["feature_shape"] = [L, D]
                out.attrs["dtype"] = "float16"
    elapsed = time.perf_counter() - t0
    dataset.close()
    summary = {
        "format": FORMAT,
        "data_dir": str(section.data_dir),
        "cache_dir": str(cache),
        "files": [features_name(p) for p in dataset.files],
        "written": [p[2].name for p in plan],
        "up_to_date": len(dataset.files) - len(plan),
        "images_encoded": total_images,
        "seconds": round(elapsed, 3),
        "images_per_s": round(total_images / elapsed, 2) if elapsed > 0 and total_images else None,
        "feature_shape": [L, D],
        "bytes": sum((cache / features_name(p)).stat().st_size for p in dataset.files),
        **{k: v for k, v in signature.items()},
        "device": str(dev),
        "valid_only_for": "a frozen vision encoder",
    }
    write_json(cache / SUMMARY, summary)
    return summary


class CachedFeatureDataset(HDF5LlavaDataset):
    """`HDF5LlavaDataset` whose items hold `module_features` (L, D) float16 instead of `image_data`.

    Text-only samples get zeros (the rows `cache-features` never writes), which the collator
    uses as the dummy image's features, like the dummy image of the image path.

    Raises MmloomError when the cache folder lacks the features file of a data file (run `mmloom data cache-
    features`).
    """

    def __init__(self, data_dir, cache_dir):
        super().__init__(data_dir, None, image_transform=None)
        self.cache_dir = Path(cache_dir)
        self.feature_files = [self.cache_dir / features_name(p) for p in self.files]
        missing = [p.name for p in self.feature_files if not p.is_file()]
        if missing:
            raise MmloomError(f"feature cache {self.cache_dir} lacks {', '.join(missing)}; run `mmloom data cache-features`")
        self.feature_h5 = LazyH5Files(self.feature_files)

    def close(self) -> None:
        if getattr(self, "feature_h5", None) is not None:
            self.feature_h5.close()
        super().close()

    def _image(self, rel: str, index: int) -> torch.Tensor:  # the base class's image hook: features instead
        file_idx, local = self.locate(index)
        return torch.from_numpy(np.asarray(self.feature_h5[file_idx][FEATURES][local]))

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["module_features"] = item.pop("image_data")
        return item


