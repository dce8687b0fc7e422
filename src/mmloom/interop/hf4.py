"""What transformers 5 writes, in the form transformers 4.x reads (configs and vision-tower weight names).

mmloom runs on transformers 5, but the consumers of its exports pin 4.x: the original LLaVA code
(transformers 4.37.2) and serving / evaluation tools (4.4x). transformers 5 renamed or nested some
config fields and some weight names; 4.x silently ignores what it does not know and falls back to
defaults, which changes the model without an error. This module writes the 4.x form:

* RoPE: 5.x ``"rope_parameters": {"rope_type", "rope_theta", ...}`` -> 4.x top-level ``"rope_theta"``
  plus ``"rope_scaling"`` (``null`` for the default type; ``{"type", "factor"}`` for ``linear`` and
  ``dynamic``, the only form transformers 4.37 accepts; ``{"rope_type", ...}`` for newer types, which
  need transformers >= 4.43). transformers 5 reads both forms, so both are kept.
* ``dtype`` -> ``torch_dtype`` (both kept).
* ``head_dim``: transformers 4.37's Llama and Mistral compute it as ``hidden_size // num_attention_heads``;
  a model whose head_dim differs cannot be represented there (:func:`check_head_dim`).
* CLIP / SigLIP vision towers: transformers 5's ``CLIPVisionModel`` saves ``embeddings.*``,
  ``encoder.*``...; 4.x names are ``vision_model.embeddings.*`` (:func:`hf4_vision_state`), and
  transformers 5 maps them back when loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import write_json

# transformers 5 classes whose 4.x state dict nests everything under one attribute.
VISION_PREFIXES = {"CLIPVisionModel": "vision_model.", "SiglipVisionModel": "vision_model."}
# rope types whose 4.37 form is {"type": ..., "factor": ...}
LEGACY_ROPE_TYPES = ("linear", "dynamic")


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, dict) else config.to_dict()


def rope_fields(config: Any) -> tuple[float | None, dict[str, Any] | None, list[str]]:
    """(rope_theta, rope_scaling in 4.x form, notes) of a config or config dict (either version's form).
    Raises MmloomError for RoPE parameters per layer type (Gemma-3 style), which 4.x cannot hold."""
    data = _as_dict(config)
    notes: list[str] = []
    params = data.get("rope_parameters")
    if not isinstance(params, dict):
        return data.get("rope_theta"), data.get("rope_scaling"), notes
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma-3 style)
        raise MmloomError(
            f"RoPE parameters per layer type {sorted(params)} have no transformers 4.x form; this export "
            "cannot hold the model for 4.x consumers"
        )
    theta = params.get("rope_theta", data.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rest = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    if rope_type == "default":
        return theta, None, notes
    if rope_type in LEGACY_ROPE_TYPES and set(rest) <= {"factor"}:
        return theta, {"type": rope_type, "factor": rest.get("factor")}, notes
    notes.append(f"rope type {rope_type!r} is written in the transformers >= 4.43 form; 4.37 cannot read it")
    return theta, {"rope_type": rope_type, **rest}, notes


def check_head_dim(config: Any, what: str) -> None:
    """Raise MmloomError when `head_dim` differs from hidden_size // num_attention_heads (4.37 computes it)."""
    data = _as_dict(config)
    head_dim, hidden, heads = data.get("head_dim"), data.get("hidden_size"), data.get("num_attention_heads")
    if head_dim is not None and hidden and heads and head_dim != hidden // heads:
        raise MmloomError(
            f"{what}: head_dim {head_dim} differs from hidden_size // num_attention_heads = {hidden // heads}; "
            "transformers 4.37 (the original LLaVA code) computes the latter, so the export would be wrong there"
        )


def hf4_config_dict(config: Any, notes: list[str] | None = None) -> dict[str, Any]:
    """A config (or config dict) with the transformers 4.x fields added next to the 5.x ones.

    Nested sub-configs (``text_config``, ``vision_config``) are converted too. Notes about fields
    that only newer 4.x releases read are appended to `notes`."""
    data = _as_dict(config)
    out = dict(data)
    for key in ("text_config", "vision_config"):
        if isinstance(out.get(key), dict):
            out[key] = hf4_config_dict(out[key], notes)
    if "rope_parameters" in out or "rope_theta" in out:
        theta, scaling, rope_notes = rope_fields(data)
        if theta is not None:
            out["rope_theta"] = float(theta)
        out["rope_scaling"] = scaling
        if notes is not None:
            notes.extend(rope_notes)
    if "dtype" in out and out.get("torch_dtype") is None:
        dtype = out["dtype"]
        out["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    return out


def weights_dtype(module: nn.Module) -> str:
    """The dtype of a module's weights as configs name it (``"float32"``, ``"bfloat16"``...)."""
    tensor = next(iter(module.parameters()), None)
    return str(tensor.dtype).removeprefix("torch.") if tensor is not None else "float32"


def hf4_vision_state(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The vision tower's weights under transformers 4.x names (``vision_model.`` for CLIP/SigLIP)."""
    prefix = VISION_PREFIXES.get(type(tower).__name__, "")
    state = {}
    for name, tensor in tower.state_dict().items():
        key = name if not prefix or name.startswith(prefix) else prefix + name
        state[key] = tensor.detach().contiguous()
    return state


def save_hf4_vision_tower(tower: nn.Module, directory: Path, notes: list[str] | None = None) -> None:
    """`CLIPVisionModel.from_pretrained(directory)` of transformers 4.x and 5.x both load this folder:
    config.json in both forms, model.safetensors under 4.x names (transformers 5 maps them back)."""
    from mmloom.model.serialization import save_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    config = hf4_config_dict(tower.config, notes)
    config["architectures"] = [type(tower).__name__]
    config["torch_dtype"] = config["dtype"] = weights_dtype(tower)
    write_json(directory / "config.json", config, sort_keys=True)
    save_state_dict(hf4_vision_state(tower), directory)
