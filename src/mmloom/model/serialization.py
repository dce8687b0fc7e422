"""Saving and loading weights and HF parts of a composite model (safetensors, sharded, atomic)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from mmloom.errors import MmloomError
from mmloom.files import atomic_directory  # noqa: F401 - re-exported: model folders are written with it

WEIGHTS_NAME = "model.safetensors"
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


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise MmloomError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")
    state: dict[str, torch.Tensor] = {}
    for filename in files:
        state.update(load_file(str(directory / filename)))
    return state


def apply_peft_specs(model, config) -> list[str]:
    """Wrap the parts of `model` that `config` (a MultimodalConfig) records as PEFT-wrapped, and that are
    not wrapped yet, with the recorded PEFT spec (LoRA ...), so that a trainable-only save of a PEFT run
    (adapter weights + the spec) loads on a base model without adapters. Returns the parts wrapped."""
    specs = [("language model", config.language_model, model, "language_model")]
    specs += [(f"{name} encoder", spec.get("module", {}), model.encoders[name], "module")
              for name, spec in config.encoders.items() if name in model.encoders]
    wrapped = []
    for what, spec, owner, attribute in specs:
        peft_spec = (spec or {}).get("peft")
        if not peft_spec or hasattr(getattr(owner, attribute), "peft_config"):
            continue
        from peft import get_peft_config, get_peft_model

        try:
            setattr(owner, attribute, get_peft_model(getattr(owner, attribute), get_peft_config(peft_spec)))
        except (ValueError, KeyError, TypeError) as err:
            raise MmloomError(f"the recorded PEFT spec of the {what} does not apply to the base model: {err}") from None
        wrapped.append(what)
    return wrapped

