"""Saving and loading weights and HF parts of a composite model (safetensors, sharded, atomic)."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from mmloom.errors import MmloomError
from mmloom.files import (
    atomic_directory,  # noqa: F401 - re-exported: model folders are written with it
    read_json,
)

WEIGHTS_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"  # transformers' names of sharded weights
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ALLOWED_CLASS_ROOTS = ("transformers.", "mmloom.")


def class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(path: str):
    """Import a model class by dotted path; only transformers and mmloom classes are allowed."""
    if not path.startswith(ALLOWED_CLASS_ROOTS):
        raise MmloomError(f"refusing to import model class {path!r}: only transformers/mmloom classes load")
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise MmloomError(f"model class {path!r} is not available in this transformers version: {err}") from err


def dedupe_shared_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return {dropped: kept}."""
    seen: dict[tuple, str] = {}
    kept, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.device.type != "meta" and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = tensor.detach().contiguous()
    return kept, tied


def save_state_dict(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str | int = "5GB") -> None:
    """Write safetensors weights, sharded with an index file when larger than `max_shard_size`."""
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def weight_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model folder (an index file's weight map, else the one
    `model.safetensors`); raises MmloomError when there are no weights or the index is unreadable."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = read_json(index, hint="the weights index is damaged").get("weight_map")
        if not isinstance(weight_map, dict):
            raise MmloomError(f"{index}: no weight_map")
        return {name: directory / filename for name, filename in weight_map.items()}
    if (directory / WEIGHTS_NAME).exists():
        from safetensors import safe_open

        path = directory / WEIGHTS_NAME
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict.fromkeys(f.keys(), path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise MmloomError(f"{path}: not a readable safetensors file ({err})") from None
    raise MmloomError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors weights (one file or an index of shards)."""
    directory = Path(directory)
    files = sorted(set(weight_files(directory).values()))
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as err:  # truncated or corrupt files: safetensors' own error types
            raise MmloomError(f"{path}: not a readable safetensors file ({err})") from None
    return state


# ----------------------------------------------------------------------- streamed safetensors
# The safetensors format (huggingface/safetensors): 8 bytes little-endian header length N, N bytes
# of JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} padded
# with spaces to a multiple of 8, then the tensors' bytes, contiguous, in header order.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: its name, full (unsharded) shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_weight_files(entries: list[TensorEntry], min_files: int = 1,
                      max_file_bytes: int = 5 * 2**30) -> list[tuple[str, list[TensorEntry]]]:
    """Split `entries` into contiguous files of about equal size: at least `min_files` (one per rank
    that writes; fewer only when there are fewer tensors) and none over `max_file_bytes` unless one
    tensor is larger. Tensors are ordered by element size (largest first, as safetensors does, so
    every tensor stays aligned), then as given.
    One file is `model.safetensors`, several are transformers' `model-0000k-of-0000K.safetensors`."""
    ordered = sorted(entries, key=lambda e: -e.dtype.itemsize)  # stable: keeps the given order
    total = sum(e.nbytes for e in ordered)
    count = max(1, min(len(ordered), max(min_files, math.ceil(total / max_file_bytes))))
    target = total / count
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for i, entry in enumerate(ordered):
        to_open = count - len(groups)  # files still to start to reach `count`
        if groups[-1] and (
            len(ordered) - i <= to_open  # one tensor per remaining file
            or size + entry.nbytes > max_file_bytes
            or (to_open > 0 and size + entry.nbytes / 2 > target)  # this file is full enough
        ):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) == 1:
        return [(WEIGHTS_NAME, groups[0])]
    return [(SHARD_NAME.format(index=i + 1, count=len(groups)), g) for i, g in enumerate(groups)]


def safetensors_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes that precede the tensor data of a safetensors file holding `entries` in order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for entry in entries:
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise MmloomError(f"{entry.name}: dtype {entry.dtype} cannot be written to safetensors")
        header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time (the header is computed from the entries first),
    so that a model is saved without holding all its tensors at once. Tensors must come in the
    entries' order; `close` checks that every one was written. Raises OSError for write failures."""

    def __init__(self, path: str | os.PathLike, entries: list[TensorEntry]):
        self.path = Path(path)
        self.entries = list(entries)
        self.position = 0
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self.file.write(safetensors_header(self.entries))
        except BaseException:
            self.file.close()
            raise

    def write(self, tensor: torch.Tensor) -> None:
        entry = self.entries[self.position]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise MmloomError(f"{entry.name}: expected {entry.dtype} {entry.shape}, got {tensor.dtype} "
                              f"{tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.position += 1

    def close(self) -> None:
        try:
            if self.position == len(self.entries):
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if self.position != len(self.entries):
            raise MmloomError(f"{self.path}: {len(self.entries) - self.position} tensor(s) were not written")


def write_weights_index(directory: Path, files: list[tuple[str, list[TensorEntry]]]) -> None:
    """transformers' `model.safetensors.index.json` for weights split over several files."""
    if len(files) < 2:
        return
    index = {"metadata": {"total_size": sum(e.nbytes for _, g in files for e in g)},
             "weight_map": {e.name: name for name, g in files for e in g}}
    (Path(directory) / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def check_safetensors_file(path: str | os.PathLike) -> str | None:
    """None when `path` is a structurally sound safetensors file (header readable, tensors
    contiguous and ending exactly at the end of the file), else what is wrong with it. Reads the
    header only: a truncated or overwritten file is caught without reading its tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name}: {size} bytes, too short for a safetensors file"
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                return f"{path.name}: truncated (header of {length} bytes, file of {size})"
            header = json.loads(f.read(length))
    except OSError as err:
        return f"{path.name}: unreadable ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError, RecursionError):
        return f"{path.name}: damaged header"
    end = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(spec["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            return f"{path.name}: damaged header entry {name!r}"
    if 8 + length + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + length + end} (truncated or damaged)"
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weight_files(folder: str | os.PathLike) -> str | None:
    """None when every safetensors file under `folder` is structurally sound
    (:func:`check_safetensors_file`), else the first problem found."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        if (problem := check_safetensors_file(path)) is not None:
            return problem
    return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers in their dtypes: about what a save of it writes."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
