"""Building models on the meta device, and where each of their tensors takes its value from.

A model a run starts from is first built on the meta device (shapes, no storage), so that no
process ever holds a whole model it does not need; its tensors are filled afterwards, one at a
time, from safetensors files (see `mmloom.training.model_loading.build_base_model`, which also
shards the model before anything is allocated). This module holds the pieces that know nothing of
processes:

- `meta_module`: an HF model built on the meta device as `from_pretrained` builds it (no random
  draws), with its buffers (rotary frequencies, position ids) computed on the CPU by transformers'
  own initialisation, exactly as `from_pretrained` computes them;
- `WeightSources`: which tensor of which file each parameter or buffer takes (keyed by the tensor
  object, so that PEFT wrapping, which renames parameters, does not lose track of them);
- `hf_folder_sources` / `mmloom_folder_sources`: those sources for an HF model folder (as
  transformers maps its keys, or None when transformers would have to convert or initialise
  something) and for an mmloom model folder;
- `SafetensorsReader`: reads one tensor at a time;
- `placeholders`, `detach_values`, `materialize`: moving parameters between the meta device, storage-
  free CPU placeholders and real storage without changing the parameter objects (ties survive).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmloom.errors import MmloomError
from mmloom.model import serialization as ser

# ------------------------------------------------------------------------------ building
_RANDOM_OPS = ("randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "uniform_",
               "normal_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_", "bernoulli_")


class _CpuDraws(TorchDispatchMode):
    """Random ops on meta tensors consume the CPU generator as the same ops on the CPU would (the
    op is run once on a CPU tensor of the same shape and dropped), so that a model built on the meta
    device leaves the random state where building it on the CPU leaves it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in _RANDOM_OPS and kwargs.get("generator") is None:
            def on_cpu(t):
                return torch.empty_like(t, device="cpu") if isinstance(t, torch.Tensor) and t.is_meta else t

            cpu_kwargs = {k: on_cpu(v) for k, v in kwargs.items()}
            if "device" in cpu_kwargs:
                cpu_kwargs["device"] = torch.device("cpu")
            func(*[on_cpu(a) for a in args], **cpu_kwargs)
        return func(*args, **kwargs)


def meta_module(factory: Callable[[], nn.Module], cpu_draws: bool = False) -> nn.Module:
    """`factory()` run on the meta device: parameters on meta (no storage), buffers on the CPU with
    the values transformers' initialisation gives them (what `from_pretrained` does for the buffers a
    checkpoint does not hold: RoPE frequencies, position ids). Random ops draw nothing, as in
    `from_pretrained`; with `cpu_draws`, they consume the random state as building on the CPU would
    (for code that builds on the CPU today, e.g. `torch.randn` in a constructor). Raises
    MmloomError for a module with buffers and no `initialize_weights` (not a transformers model):
    its buffers could not be computed."""
    with torch.device("meta"), (_CpuDraws() if cpu_draws else contextlib.nullcontext()):
        module = factory()
    for sub in module.modules():
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                sub._buffers[name] = torch.empty_like(buffer, device="cpu")
    init = getattr(module, "initialize_weights", None)
    if init is None and any(True for _ in module.buffers()):
        raise MmloomError(f"{type(module).__name__} cannot compute its buffers on the meta device (no "
                          "transformers initialize_weights)")
    if init is not None:
        flagged = [p for p in module.parameters()]
        for p in flagged:  # transformers' init functions skip tensors marked as loaded
            p._is_hf_initialized = True
        try:
            init()
        finally:
            for p in flagged:
                with contextlib.suppress(AttributeError):
                    del p._is_hf_initialized
            for sub in module.modules():
                with contextlib.suppress(AttributeError):
                    del sub._is_hf_initialized
    return module


def unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of `model`'s state dict (parameters and persistent buffers, as the module
    objects: DTensors under FSDP2), each tensor once (a tied weight under its first name)."""
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield param


def _swap(param: nn.Parameter, data: torch.Tensor) -> None:
    """Give `param` new data (another device) while keeping the object (ties, optimizer refs)."""
    torch.utils.swap_tensors(param, nn.Parameter(data, requires_grad=param.requires_grad))


@contextlib.contextmanager
def placeholders(model: nn.Module):
    """Within the block, the meta parameters of `model` are CPU tensors without storage (one element
    broadcast to the shape): code that places new modules on the device of existing ones (PEFT puts
    LoRA adapters on the device of the layer they adapt) creates them on the CPU, with their values.
    Writing to a placeholder raises; afterwards they are meta again."""
    swapped = [p for p in _unique_parameters(model) if p.device.type == "meta"]
    for p in swapped:
        _swap(p, torch.empty((), dtype=p.dtype).expand(p.shape))
    try:
        yield
    finally:
        for p in swapped:
            _swap(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def detach_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move every parameter of `model` that has storage to the meta device; returns their values
    by state-dict name (the values of the parts built with random weights, to be handed out later)."""
    ids = {id(p) for p in _unique_parameters(model) if p.device.type != "meta"}
    values = {name: t.detach() for name, t in unique_state(model) if id(t) in ids}
    for p in _unique_parameters(model):
        if p.device.type != "meta":
            _swap(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return values


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate storage on `device` (uninitialised) for every meta parameter of `model` (after
    FSDP2's `fully_shard`: every shard) and move the rest there; buffers keep their values."""
    if any(hasattr(p, "device_mesh") for p in model.parameters()):  # FSDP2: DTensor shards
        buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
        model.to_empty(device=device)  # swaps every parameter in place (FSDP2's documented way)
        for module, name, buffer in buffers:
            module._buffers[name] = buffer.to(device)
        return
    for p in _unique_parameters(model):
        if p.device.type == "meta":
            _swap(p, torch.empty(p.shape, dtype=p.dtype, device=device))
    model.to(device)


# ------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class TensorSource:
    """One tensor of a safetensors file."""

    path: Path
    key: str


class WeightSources:
    """Which file tensor each parameter / buffer of a model built on the meta device takes, keyed
    by the tensor object (PEFT wrapping renames parameters but keeps the objects). Later entries for
    the same tensor replace earlier ones (start weights over pretrained parts)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[torch.Tensor, TensorSource]] = {}

    def add(self, tensor: torch.Tensor, source: TensorSource) -> None:
        self._by_id[id(tensor)] = (tensor, source)  # the tensor is kept: its id stays its own

    def add_by_name(self, model: nn.Module, sources: dict[str, TensorSource]) -> None:
        """Sources given by `model`'s state-dict names (names it lacks are ignored)."""
        state = model.state_dict(keep_vars=True)
        for name, source in sources.items():
            if name in state:
                self.add(state[name], source)

    def by_name(self, model: nn.Module) -> dict[str, TensorSource]:
        """The sources by `model`'s state-dict names now (each tied tensor under its first name)."""
        return {name: self._by_id[id(t)][1] for name, t in unique_state(model) if id(t) in self._by_id}


def _header_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise MmloomError(f"{path}: not a readable safetensors file ({err})") from None
    return shapes


def hf_folder_sources(model: nn.Module, folder: str | Path) -> dict[str, TensorSource] | None:
    """The file tensor of every state-dict entry of `model` (an HF model built on the meta device
    from `folder`'s config) in `folder`'s safetensors weights, matched as `from_pretrained` matches
    them: transformers' own key renamings for the model (e.g. the `vision_model.` prefix of a whole
    CLIP folder for `CLIPVisionModel`) and its base-model prefix added or removed; shapes equal.
    None when that does not cover every tensor one to one (no safetensors files, weights
    transformers fuses or splits, tensors it would initialise): such a folder is loaded by
    transformers itself."""
    try:
        files = ser.weight_files(Path(folder))
    except MmloomError:
        return None
    shapes = _header_shapes(files)
    state = model.state_dict(keep_vars=True)
    rename = _hf_renamer(model, state)
    found: dict[str, str] = {}  # state-dict name -> file key
    for key in files:
        target = rename(key)
        if target is None:
            return None  # a conversion, not a renaming
        if target in state:
            if target in found or shapes[key] != tuple(state[target].shape):
                return None
            found[target] = key
    names: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)
    out: dict[str, TensorSource] = {}
    for name, tensor in unique_state(model):
        key = next((found[n] for n in names[id(tensor)] if n in found), None)
        if key is None:
            return None
        out[name] = TensorSource(files[key], key)
    return out


def _hf_renamer(model: nn.Module, state: dict) -> Callable[[str], str | None]:
    """checkpoint key -> the state-dict name `from_pretrained` loads it into (None: a key transformers
    converts, e.g. fuses with others). transformers' renaming rules where this version has them,
    else the base-model prefix alone."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except (ImportError, AttributeError, TypeError):
        return lambda key: _prefixed(key, prefix, state)

    def rename(key: str) -> str | None:
        target, pattern = rename_source_key(key, renamings, converters, prefix or None, state)
        if target not in state and key in state:  # as `from_pretrained`: the key as it is, prefix aside
            target, pattern = rename_source_key(key, [], [], prefix or None, state)
        return None if pattern is not None and target in state else target

    try:
        rename(next(iter(state), ""))
    except (TypeError, AttributeError):  # another signature in this transformers version
        return lambda key: _prefixed(key, prefix, state)
    return rename


def _prefixed(key: str, prefix: str, state: dict) -> str:
    """`key`, or with the base-model prefix removed or added, whichever the model has."""
    if key in state or not prefix:
        return key
    if key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in state:
        return key[len(prefix) + 1:]
    return f"{prefix}.{key}" if f"{prefix}.{key}" in state else key


def mmloom_folder_sources(folder: str | Path, model: nn.Module, strict: bool = False) -> dict[str, TensorSource]:
    """The file tensor of each state-dict entry of `model` that an mmloom model folder holds (its
    tied weights resolved). Raises MmloomError, as `MultimodalModel.load_weights` does, for names
    `model` lacks and (with `strict`) for tensors of `model` the folder lacks; and for shapes that
    differ, naming the first."""
    from mmloom.model.multimodal import MultimodalConfig

    folder = Path(folder)
    config = MultimodalConfig.load(folder)
    files = ser.weight_files(folder)
    shapes = _header_shapes(files)
    keys = {name: name for name in files}
    for dropped, kept in (config.tied_weights or {}).items():
        if kept in keys:
            keys[dropped] = kept
    state = model.state_dict(keep_vars=True)
    unexpected = [name for name in keys if name not in state]
    if unexpected:
        raise MmloomError(f"weights do not fit this model; unexpected keys: {unexpected[:5]}")
    for name, key in keys.items():
        if shapes[key] != tuple(state[name].shape):
            raise MmloomError(
                f"weights in {folder} do not fit the configured model: size mismatch for {name}: the file has "
                f"{list(shapes[key])}, the model {list(state[name].shape)}"
            )
    if strict:
        ids = {id(state[name]) for name in keys}
        missing = [name for name, t in unique_state(model) if id(t) not in ids]
        if missing:
            raise MmloomError(f"weights are missing for: {missing[:5]}")
    return {name: TensorSource(files[key], key) for name, key in keys.items()}


class SafetensorsReader:
    """Reads single tensors of safetensors files with plain reads (each header parsed once; use as a
    context manager). Not memory-mapped: a process's resident memory holds the tensor read, not the
    pages of the file it came from."""

    def __init__(self) -> None:
        self._headers: dict[Path, tuple[int, dict]] = {}

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + length, json.loads(f.read(length)))
        return self._headers[path]

    def read(self, source: TensorSource, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor (on the CPU), cast to `dtype` when given. Raises MmloomError when the file
        cannot be read or does not hold the tensor whole."""
        try:
            start, header = self._header(source.path)
            entry = header[source.key]
            begin, end = entry["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            with open(source.path, "rb") as f:
                f.seek(start + begin)
                if f.readinto(memoryview(data.numpy())) != end - begin:
                    raise ValueError("truncated")
            tensor = data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise MmloomError(f"{source.path}: cannot read {source.key} ({err})") from None
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self._headers.clear()


_DTYPES = {name: dtype for dtype, name in ser.SAFETENSORS_DTYPES.items()}
