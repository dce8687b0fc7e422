"""Atomic, verified, resumable training checkpoints for one process, DDP and FSDP2.

`MODEL_DIR/checkpoint-N/` (checkpoint format 2) holds
- an mmloom model folder: `config.json` + safetensors weights (trainable ones by default; several
  `model-0000k-of-0000K.safetensors` files + `model.safetensors.index.json` with several ranks or
  over 5 GB). The weights are streamed tensor by tensor: under FSDP each tensor is all-gathered in
  turn and written by the rank that owns its file, so no rank ever holds the whole model;
- the processor files (`mmloom_processor.json`, tokenizer, image transform), as with final_model;
- `run_config.yaml`: the run's resolved training config (trainable-only checkpoints), from which
  :func:`mmloom.training.model_loading.load_model` rebuilds the base model when none is given;
- `optimizer/`: the optimizer state (AdamW moments and steps) written with
  `torch.distributed.checkpoint` in safetensors files (`HuggingFaceStorageWriter`): each rank writes
  its own shard, and the state loads on any number of ranks (resharded on load);
- `rng_state_R.json`: the python / numpy / torch (/ CUDA) RNG states of rank R;
- `trainer_state.json`: step, data position, world size, the run's config, frozen-weight
  fingerprint, which parameters have optimizer state, the optimizer's parameter groups;
- `manifest.json`, written last: the size of every file and the SHA-256 of those up to 64 MiB.

Nothing in a checkpoint is read with pickle: JSON, safetensors, and `torch.load(weights_only=True)`
for the files of format 1 (mmloom before the manifest: `optimizer.pt` + `rng_state_R.pt`), which
still resume. The folder is written as `.checkpoint-N.tmp-partial` by all ranks, verified against
what was meant to be written, and renamed (atomic): a killed or failed save leaves the earlier
checkpoints as they were. A save that fails (full disk) is one MmloomError naming the folder and the
space the checkpoint needs, on every rank, with nothing of it left behind.

At resume, the run folder (:meth:`mmloom.training.run_folder.RunFolder.resume_point`) has
:func:`verify_checkpoint` check the checkpoints newest first (manifest sizes and hashes, safetensors
headers, readable JSON) and takes the newest complete one, naming what it skipped; a checkpoint
whose optimizer or RNG state is missing is refused unless `runconfig.resume_weights_only` asks for
its weights alone.

:func:`mmloom.training.model_loading.load_model` loads any of them for inference, conversion or
merging: a full save as it is; a trainable-only checkpoint on `base` (PEFT adapters applied as
recorded), or, without `base`, on the base model its run config describes (checked against the
recorded frozen-weight fingerprint).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import apply_umask, free_bytes, is_disk_full, mib, read_json
from mmloom.model import serialization as ser
from mmloom.training.distributed import DistContext, unwrap
from mmloom.training.run_folder import (
    RESOLVED_CONFIG,
    RUN_CONFIG,
    TRAINER_STATE,
    RunFolder,
    old_sibling,
    temp_sibling,
)

FORMAT = 2
MANIFEST = "manifest.json"
OPTIMIZER_DIR = "optimizer"
LEGACY_OPTIMIZER = "optimizer.pt"  # format 1
HASH_LIMIT = 64 * 2**20  # files up to this size get a SHA-256 in the manifest
OPTIMIZER_FILE_BYTES = 2**30  # optimizer state per file (full size; each rank writes its part)


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


def legacy_rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


class CheckpointWriteError(MmloomError):
    """A checkpoint or final model could not be written (full disk, permissions); nothing of it was kept."""


# ------------------------------------------------------------------------------- RNG states
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (/ CUDA) RNG states as a JSON-serialisable dict."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of `rng_state()` (also accepts format 1's python objects)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch_state = state["torch"]
    torch.set_rng_state(_from_b64(torch_state) if isinstance(torch_state, str) else torch_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) if isinstance(s, str) else s for s in state["cuda"]])


def _numpy_safe_globals() -> list:
    """numpy objects in format 1's pickled RNG state (data only: array reconstruction, dtypes)."""
    import numpy.core.multiarray as legacy_multiarray  # numpy < 2 names, still importable

    names = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), legacy_multiarray._reconstruct]
    try:
        from numpy._core import multiarray

        names.append(multiarray._reconstruct)
    except ImportError:
        pass
    return names


def read_legacy_rng(path: Path) -> dict[str, Any]:
    """A format-1 `rng_state_R.pt`, loaded without running code (`weights_only=True`, numpy arrays allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core's deprecation notice
        allowed = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code (refused) and damaged files
        raise MmloomError(f"{path}: not a loadable RNG state ({str(err).splitlines()[0]}); it is not run: "
                          "set runconfig.resume_weights_only=true to resume without it") from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise MmloomError(f"{path}: not an RNG state")
    return state


# --------------------------------------------------------------------------- model weights
def model_tensors(model: nn.Module, trainable_only: bool) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """(name, tensor) of the model's state dict, each shared (tied) tensor once, and {dropped: kept}
    for the tied names. Under FSDP the tensors are the sharded DTensors (full shapes)."""
    base = unwrap(model)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    kept: list[tuple[str, torch.Tensor]] = []
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in base.state_dict(keep_vars=True).items():
        if trainable_only and name not in trainable:
            continue
        if id(tensor) in seen:
            tied[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        kept.append((name, tensor))
    return kept, tied


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor: every rank must call it in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape) * tensor.dtype.itemsize


def write_model_folder(directory: Path, model: nn.Module, ctx: DistContext, trainable_only: bool) -> OSError | None:
    """Write an mmloom model folder (config.json + safetensors) into `directory`, streamed tensor by
    tensor. Collective: every rank calls it; the weight files are spread over the ranks (each
    writes its own), rank 0 writes config.json and the index. Returns this rank's write error
    (every rank keeps taking part in the gathers after one) or None."""
    base = unwrap(model)
    tensors, tied = model_tensors(model, trainable_only)
    entries = [ser.TensorEntry(name, tuple(t.shape), t.dtype) for name, t in tensors]
    files = ser.plan_weight_files(entries, min_files=ctx.world_size if ctx.distributed else 1)
    by_name = dict(tensors)
    error: OSError | None = None
    for index, (filename, group) in enumerate(files):
        writer = None
        if index % ctx.world_size == ctx.rank and error is None:
            try:
                writer = ser.SafetensorsStreamWriter(directory / filename, group)
            except OSError as err:
                error = err
        for entry in group:
            full = _full(by_name[entry.name]).detach()
            if writer is not None:
                try:
                    writer.write(full)
                except OSError as err:
                    error, writer = err, _abandon(writer)
            del full
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                error = err
    if ctx.is_main and error is None:
        try:
            config = base.config
            config.torch_dtype = "float32"
            config.tied_weights = tied
            config.trainable_only = trainable_only
            config.save(directory)
            ser.write_weights_index(directory, files)
        except OSError as err:
            error = err
    return error


def _abandon(writer) -> None:
    try:
        writer.file.close()
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------- optimizer state
def optimizer_tensors(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state as {"<parameter name>.<state key>": tensor} (DTensor shards under FSDP);
    only parameters that have state (an unused trainable parameter has none)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)["state"]
    flat = {}
    for name, values in state.items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise MmloomError(f"optimizer state {name}.{key} is not a tensor ({type(value).__name__})")
            flat[f"{name}.{key}"] = value
    return flat


def _file_index(flat: dict[str, torch.Tensor]) -> dict[str, int]:
    """Optimizer tensors -> file numbers (1..K) of about OPTIMIZER_FILE_BYTES each (same on every rank)."""
    mapping, index, size = {}, 1, 0
    for key in sorted(flat):
        if size and size + _nbytes(flat[key]) > OPTIMIZER_FILE_BYTES:
            index, size = index + 1, 0
        mapping[key] = index
        size += _nbytes(flat[key])
    return mapping


def write_optimizer_state(directory: Path, flat: dict[str, torch.Tensor], ctx: DistContext) -> None:
    """`torch.distributed.checkpoint.save` of `flat` into `directory` (safetensors; each rank its shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(directory), fqn_to_index_mapping=_file_index(flat), save_distributed=True)
    with _single_process_quiet():
        dcp.save(flat, storage_writer=writer, no_dist=not ctx.distributed)


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it assumes one process when there is no process
    group: that is what mmloom asks for (`no_dist`), so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def load_optimizer_state(folder: Path, model: nn.Module, optimizer, saved: list[str] | None, ctx: DistContext) -> None:
    """Load the optimizer state of `folder` (format 2: `optimizer/` for the parameters in `saved`;
    format 1: `optimizer.pt`) into `optimizer`, resharded for this run's ranks. Parameters without
    saved state get none (as in the run that saved it). The parameter groups' hyperparameters stay
    those of this run's config. Raises MmloomError when the state does not fit."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    current = get_optimizer_state_dict(model, optimizer)  # every trainable parameter, initialised
    if saved is None:  # format 1: the full state, keyed by parameter names
        path = folder / LEGACY_OPTIMIZER
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = loaded["state"]
        except Exception as err:
            raise MmloomError(f"{path}: not a loadable optimizer state ({str(err).splitlines()[0]})") from None
        options = StateDictOptions(full_state_dict=True, strict=False)
    else:
        unknown = sorted(set(saved) - set(current["state"]))
        if unknown:
            raise MmloomError(
                f"{folder} has optimizer state for parameters this run does not train ({', '.join(unknown[:3])}"
                f"{', ...' if len(unknown) > 3 else ''}): was model.freeze or model.lora changed?"
            )
        flat = {f"{name}.{key}": value for name in saved for key, value in current["state"][name].items()}
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        try:
            with _single_process_quiet():
                dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / OPTIMIZER_DIR)),
                         no_dist=not ctx.distributed)
        except BaseException as err:  # CheckpointException is a BaseException
            if not isinstance(err, Exception) and not _is_checkpoint_exception(err):
                raise
            raise MmloomError(f"{folder / OPTIMIZER_DIR}: the optimizer state does not load "
                              f"({_first_line(err)})") from None
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            name, _, item = key.rpartition(".")
            state.setdefault(name, {})[item] = value
        options = StateDictOptions(strict=False)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": current["param_groups"]},
                             options=options)


def _first_line(err: BaseException) -> str:
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


# --------------------------------------------------------------------------------- writing
def _disk_words(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "file size limit exceeded"
    if is_disk_full(err):
        return "no space left on the device"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return _first_line(err)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Record the size (and, up to HASH_LIMIT, the SHA-256) of every file of `folder` in manifest.json."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            size = path.stat().st_size
            entry: dict[str, Any] = {"bytes": size}
            if size <= HASH_LIMIT:
                entry["sha256"] = ser.file_sha256(path)
            files[path.relative_to(folder).as_posix()] = entry
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


@dataclass
class _Save:
    """One collective save into `target` (a checkpoint or the final model): a deterministic
    temporary sibling all ranks write into, agreement on failure, cleanup, rename."""

    target: Path
    ctx: DistContext
    needed: int
    what: str

    @property
    def tmp(self) -> Path:
        return temp_sibling(self.target)

    def begin(self) -> None:
        """Rank 0 clears a stale temporary folder and checks the free space; all ranks learn the outcome."""
        problem = None
        if self.ctx.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
            try:
                self.tmp.mkdir(parents=True)
            except OSError as err:
                problem = _disk_words(err)
            free = free_bytes(self.target.parent)
            if problem is None and 0 <= free < self.needed:
                problem = f"{mib(free)} free"
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.agree(problem)

    def agree(self, problem: str | None) -> None:
        """Every rank raises the same CheckpointWriteError when any rank had a problem."""
        failed = float(self.ctx.all_reduce_sum([1.0 if problem else 0.0])[0])
        if not failed:
            return
        problems = self.ctx.gather_objects(problem)
        if self.ctx.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
        text = "; ".join(sorted({p for p in (problems or [problem]) if p})) or "failed on another rank"
        self.ctx.barrier()
        raise CheckpointWriteError(
            f"cannot write {self.what} {self.target}: {text} (it needs about {mib(self.needed)}, "
            f"{mib(max(free_bytes(self.target.parent), 0))} free); nothing of it was kept"
            + ("; the earlier checkpoints are intact" if self.what == "checkpoint" else "")
        )

    def step(self, fn, *args) -> Any:
        """Run one write phase on this rank; a failure on any rank is agreed on (and raised) by all."""
        problem, result = None, None
        try:
            result = fn(*args)
        except OSError as err:
            problem = _disk_words(err)
        except MmloomError as err:
            problem = str(err)
        except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is one
            if not _is_checkpoint_exception(err):
                raise
            problem = _disk_words(_cause(err))
        if isinstance(result, BaseException):
            problem = _disk_words(result)
        self.agree(problem)
        return result

    def finish(self, verify: bool = True) -> None:
        """Rank 0 verifies what was written, writes the manifest and renames into place."""
        problem = None
        if self.ctx.is_main:
            try:
                if verify:
                    for path in self.tmp.rglob("*.safetensors"):
                        problem = problem or ser.check_safetensors_file(path)
                if problem is None:
                    write_manifest(self.tmp)
                    apply_umask(self.tmp)  # safetensors writes 0600 files
                    old = None
                    if self.target.exists():  # an older save of the same step (a damaged one): replaced
                        old = old_sibling(self.target)
                        shutil.rmtree(old, ignore_errors=True)
                        self.target.rename(old)
                    self.tmp.rename(self.target)
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
            except OSError as err:
                problem = _disk_words(err)
        self.agree(problem)
        self.ctx.barrier()


def _is_checkpoint_exception(err: BaseException) -> bool:
    return type(err).__name__ == "CheckpointException"


def _cause(err: BaseException) -> BaseException:
    failures = getattr(err, "failures", None) or {}
    for exc, _ in failures.values():
        return exc
    return err


def save_checkpoint(
    model_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    trainable_only: bool = True,
    keep_last: int | None = None,
    processor=None,
) -> Path:
    """Save `checkpoint-{step}` (format 2, see the module docstring). Collective: every rank calls it.
    `processor` (a MultimodalProcessor, on rank 0) is saved with it so that chat / generate / convert
    can use the folder. Raises CheckpointWriteError on every rank when any write fails (nothing of it
    is kept)."""
    run_folder = RunFolder(model_dir)
    target = run_folder.checkpoint(step)
    tensors, _ = model_tensors(model, trainable_only)
    flat = optimizer_tensors(model, optimizer)
    needed = sum(_nbytes(t) for _, t in tensors) + sum(_nbytes(t) for t in flat.values()) + 2**20
    save = _Save(target, ctx, needed, "checkpoint")
    save.begin()
    save.step(write_model_folder, save.tmp, model, ctx, trainable_only)
    save.step(write_optimizer_state, save.tmp / OPTIMIZER_DIR, flat, ctx)
    save.step((save.tmp / rng_file(ctx.rank)).write_text, json.dumps(rng_state()))
    saved = sorted({key.rpartition(".")[0] for key in flat})
    state = {**trainer_state, "format": FORMAT, "optimizer": {"params_with_state": saved}}
    if ctx.is_main:
        save.step(_write_rank0_files, save.tmp, Path(model_dir), state, trainable_only, processor)
    else:
        save.step(lambda: None)
    save.finish()
    if ctx.is_main and keep_last is not None:
        run_folder.prune(keep_last)
    ctx.barrier()
    return target


def _write_rank0_files(tmp: Path, model_dir: Path, state: dict, trainable_only: bool, processor) -> None:
    """trainer_state.json, the processor files and (trainable-only) run_config.yaml of a checkpoint."""
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
    if processor is not None:
        processor.save_pretrained(tmp)
    if trainable_only and (model_dir / RESOLVED_CONFIG).exists():
        shutil.copyfile(model_dir / RESOLVED_CONFIG, tmp / RUN_CONFIG)


def save_model(target: Path, model: nn.Module, ctx: DistContext, extra=None) -> None:
    """Write a full mmloom model folder (all weights) at `target` atomically, streamed (no rank holds
    the whole model); `extra(folder)` runs on rank 0 before the rename (e.g. to save the processor).
    Collective. Raises CheckpointWriteError on every rank when a write fails."""
    tensors, _ = model_tensors(model, trainable_only=False)
    save = _Save(Path(target), ctx, sum(_nbytes(t) for _, t in tensors) + 2**20, "model folder")
    save.begin()
    save.step(write_model_folder, save.tmp, model, ctx, False)
    if ctx.is_main and extra is not None:
        save.step(extra, save.tmp)
    else:
        save.step(lambda: None)
    save.finish()


# --------------------------------------------------------------------------------- reading
def read_trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.exists():
        raise MmloomError(f"{folder} is not a training checkpoint (no {TRAINER_STATE}); "
                          "use runconfig.load_checkpoint_states: model")
    return read_json(path, hint="the checkpoint is damaged")


def _is_state_file(rel: str) -> bool:
    """The optimizer and RNG state (a checkpoint without them resumes with `resume_weights_only`);
    every other file (weights, config, trainer state, processor) is needed to resume at all."""
    return rel.startswith((f"{OPTIMIZER_DIR}/", "rng_state_", LEGACY_OPTIMIZER))


@dataclass
class CheckpointCheck:
    """What is wrong with a checkpoint: problems with its weights (or trainer state), and with its
    optimizer / RNG state (resumable with `resume_weights_only`)."""

    folder: Path
    weights: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)

    def usable(self, weights_only: bool) -> bool:
        return not self.weights and (weights_only or not self.state)

    def describe(self, weights_only: bool = False) -> str:
        problems = self.weights + ([] if weights_only else self.state)
        return f"{self.folder.name}: {'; '.join(problems[:3])}" + (" ..." if len(problems) > 3 else "")


def verify_checkpoint(folder: Path) -> CheckpointCheck:
    """Check a checkpoint folder without loading its tensors: the manifest's files (sizes, hashes),
    readable JSON, structurally sound safetensors files; format 1 (no manifest): the files it needs."""
    folder = Path(folder)
    check = CheckpointCheck(folder)

    def report(rel: str, problem: str) -> None:
        (check.state if _is_state_file(rel) else check.weights).append(problem)

    try:
        state = read_trainer_state(folder)
    except MmloomError as err:
        check.weights.append(str(err).replace(str(folder) + "/", ""))
        return check
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        try:
            files = read_json(manifest_path)["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not a JSON object")
        except (MmloomError, KeyError, TypeError) as err:
            check.weights.append(f"{MANIFEST} is damaged ({err})")
            return check
        for rel, entry in sorted(files.items()):
            path = folder / rel
            if not path.is_file():
                report(rel, f"{rel} is missing")
            elif path.stat().st_size != entry.get("bytes"):
                report(rel, f"{rel} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')} (truncated?)")
            elif "sha256" in entry and ser.file_sha256(path) != entry["sha256"]:
                report(rel, f"{rel} differs from what was written (SHA-256 mismatch)")
            elif rel.endswith(".safetensors") and (problem := ser.check_safetensors_file(path)):
                report(rel, problem)
        return check
    if int(state.get("format", 1) or 1) >= 2:
        check.weights.append(f"no {MANIFEST} (written last: the save did not finish)")
        return check
    # format 1: no manifest
    try:
        weights = sorted(set(ser.weight_files(folder).values()))
    except MmloomError as err:
        check.weights.append(str(err))
        weights = []
    for path in weights:
        if (problem := ser.check_safetensors_file(path)) is not None:
            check.weights.append(problem)
    if not (folder / LEGACY_OPTIMIZER).is_file():
        check.state.append(f"no {LEGACY_OPTIMIZER}")
    for rank in range(int(state.get("world_size", 1) or 1)):
        if not (folder / legacy_rng_file(rank)).is_file():
            check.state.append(f"no {legacy_rng_file(rank)}")
    return check


def load_training_state(folder: Path, model: nn.Module, optimizer, ctx: DistContext,
                        weights_only: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Restore the optimizer state and this rank's RNG from a checkpoint (after its weights) unless
    `weights_only`; returns its trainer state and notes for the user (an RNG state the checkpoint
    lacks because it was written by fewer ranks). Raises MmloomError when the state is missing or
    does not load."""
    folder = Path(folder)
    state = read_trainer_state(folder)
    notes: list[str] = []
    if weights_only:
        return state, notes
    legacy = int(state.get("format", 1)) < 2
    if legacy:
        if not (folder / LEGACY_OPTIMIZER).is_file():
            raise MmloomError(f"{folder} has no optimizer state ({LEGACY_OPTIMIZER}); set "
                              "runconfig.resume_weights_only=true to continue from its weights with a fresh optimizer")
        load_optimizer_state(folder, model, optimizer, None, ctx)
    else:
        saved = (state.get("optimizer") or {}).get("params_with_state")
        if not isinstance(saved, list) or not (folder / OPTIMIZER_DIR).is_dir():
            raise MmloomError(f"{folder} has no optimizer state; set runconfig.resume_weights_only=true to continue "
                              "from its weights with a fresh optimizer")
        load_optimizer_state(folder, model, optimizer, saved, ctx)
    path = folder / (legacy_rng_file(ctx.rank) if legacy else rng_file(ctx.rank))
    if path.is_file():
        set_rng_state(read_legacy_rng(path) if legacy else read_json(path, hint="the checkpoint is damaged"))
    elif ctx.rank < int(state.get("world_size", 1) or 1):
        raise MmloomError(f"{folder} has no {path.name}; set runconfig.resume_weights_only=true to continue without it")
    else:
        notes.append(f"{folder.name} was written by {state.get('world_size')} rank(s): rank {ctx.rank} starts "
                     "from the seeded RNG state")
    return state, notes


# ---------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """When and what a run saves into its run folder, after `runconfig`: `checkpoint-N` every
    `checkpoint_steps` steps and at the last step (:meth:`save`), or at once when asked (`force`: a
    stop), the newest `keep_last` of them kept; the final model (:meth:`save_final_model`). Each
    checkpoint holds the trainer state `state(step)` gives and, like the final model, the processor
    `processor()` builds ((processor, why not); built once, on rank 0), so that chat, generate and
    convert take the folder as it is. :meth:`load` restores a checkpoint's optimizer and RNG state.

    `last_saved` is the step of this run's newest checkpoint (None before the first; the resumed
    checkpoint's after :meth:`load`), `last_state` the trainer state it holds. Every method is
    collective under torchrun."""

    def __init__(self, run_folder: RunFolder, model: nn.Module, optimizer, ctx: DistContext, run,
                 state: Callable[[int], dict[str, Any]], processor: Callable[[], tuple[Any, str | None]]):
        self.run_folder = run_folder
        self.model = model
        self.optimizer = optimizer
        self.ctx = ctx
        self.every = run.checkpoint_steps
        self.keep_last = run.keep_last
        self.trainable_only = run.save_trainable_only
        self.state = state
        self.make_processor = processor
        self.processor: tuple[Any, str | None] | None = None  # built at the first save
        self.last_saved: int | None = None
        self.last_state: dict[str, Any] = {}

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether step `step` (1-based, done) gets a checkpoint: every `checkpoint_steps`, and the last."""
        return bool(self.every and step % self.every == 0) or last_step

    def saved_processor(self) -> tuple[Any, str | None]:
        """(processor, why not) saved with checkpoints and the final model, built once (rank 0 only)."""
        if self.processor is None:
            self.processor = self.make_processor() if self.ctx.is_main else (None, "not the main process")
        return self.processor

    def save(self, step: int, last_step: bool = False, force: bool = False) -> Path | None:
        """Save `checkpoint-{step}` when it is due (:meth:`due`) or `force`d; returns its path, or None
        when no checkpoint was due. Raises CheckpointWriteError on every rank when a write fails
        (nothing of it is kept; the earlier checkpoints are intact)."""
        if not (force or self.due(step, last_step)):
            return None
        state = self.state(step)
        path = save_checkpoint(self.run_folder.path, step, self.model, self.optimizer, state, self.ctx,
                               trainable_only=self.trainable_only, keep_last=self.keep_last,
                               processor=self.saved_processor()[0])
        self.last_saved, self.last_state = step, state
        return path

    def save_final_model(self) -> None:
        """`final_model/`: all weights, streamed (see :func:`save_model`), with the processor when the
        data allows one (so that chat/generate/convert can use the folder as it is)."""
        processor, why_not = None, None
        if self.ctx.is_main:
            processor, why_not = self.saved_processor()
        extra = (lambda folder: processor.save_pretrained(folder)) if processor is not None else None
        save_model(self.run_folder.final_model, self.model, self.ctx, extra)
        if self.ctx.is_main and processor is None:
            print(f"note: no processor saved with the final model ({why_not})")

    def load(self, folder: Path, weights_only: bool = False, same_run: bool = True) -> tuple[dict[str, Any], list[str]]:
        """Restore the optimizer and RNG state of the checkpoint `folder` (its weights are loaded
        already; nothing with `weights_only`), see :func:`load_training_state`; a checkpoint of this run
        (`same_run`) becomes `last_saved`. Returns its trainer state and notes for the user."""
        state, notes = load_training_state(folder, self.model, self.optimizer, self.ctx, weights_only=weights_only)
        if same_run:
            self.last_saved = int(state["global_step"])
        return state, notes

