"""The run folder of `mmloom train` (`--model-dir`): its names, what is in it, one writer at a time.

A run folder holds one run:

- `checkpoint-N/`: the checkpoint of step N (what is inside: :mod:`mmloom.training.checkpoint`);
  complete when it holds `trainer_state.json` (a checkpoint is renamed into place whole, so only a
  folder copied or damaged by hand lacks it);
- `final_model/`: the full model at the end of the run;
- `resolved_config.yaml`: the config as the run uses it (a trainable-only checkpoint carries a copy,
  `run_config.yaml`, from which the model it holds the difference to is rebuilt);
- `metrics.jsonl` and `tensorboard/`: what every step recorded; `eval_results.json`: `--mode eval`
  and the end of `--mode train_and_eval`;
- `reference_logps.safetensors`: a preference run's reference log-probabilities, computed once at
  its first start and read when it resumes (:mod:`mmloom.training.preference`);
- `.NAME.tmp-partial`: a save of `NAME` in progress, renamed to `NAME` once verified;
  `.NAME.old`: an earlier save of the same name while it is replaced. An interrupted save leaves
  them behind; the next trainer removes them (:meth:`RunFolder.remove_stale_saves`);
- `.mmloom.lock`: the lock below.

Two trainers writing one run folder would interleave checkpoints and metrics of different runs,
and an evaluation that cleaned up the trainer's temporary folders would break the trainer's next
save. So every `mmloom train` holds the run folder's lock (:meth:`RunFolder.lock`:
:class:`mmloom.outputs.FolderLock`, an `flock` on `MODEL_DIR/.mmloom.lock` that the kernel releases
when the process ends, however it ends) for as long as it runs:

- training (`--mode train`, `train_and_eval`) takes it exclusively, before anything in the folder is
  read or changed; a second trainer or an evaluation is refused in one line naming the holder's
  command, PID and host; only this writer removes what interrupted saves left;
- evaluation (`--mode eval`) shares it with other evaluations (it reads the newest checkpoint and
  writes `eval_results.json`) and never touches a trainer's temporary folders.

Under torchrun, rank 0 takes the lock and every rank learns the outcome (one refusal on each rank).
The result files (`resolved_config.yaml`, `eval_results.json`) are written atomically: a killed
write leaves the earlier file or the complete new one. Layout after torchtune's
`training/checkpointing/_utils.py`: the names and the helpers that use them in one place.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mmloom.errors import MmloomError
from mmloom.files import write_json, write_text
from mmloom.outputs import LOCK_NAME, FolderLock, disk_full_as_error
from mmloom.training.distributed import DistContext

CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-N: the checkpoint of step N
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_MODEL = "final_model"
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: written last before its manifest; marks it complete
RUN_CONFIG = "run_config.yaml"  # in a trainable-only checkpoint: the run's resolved config
RESOLVED_CONFIG = "resolved_config.yaml"
EVAL_RESULTS = "eval_results.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
REFERENCE_LOGPS = "reference_logps.safetensors"  # a preference run's precomputed reference log-probabilities
PARTIAL = ".tmp-partial"  # suffix of the temporary sibling a save is written into
OLD = ".old"  # suffix of an earlier save of the same name while it is replaced
LOCK = LOCK_NAME

_WRITERS: set[Path] = set()  # run folders this process holds the exclusive lock of


def checkpoint_name(step: int) -> str:
    """`checkpoint-{step}`."""
    return f"{CHECKPOINT_PREFIX}{step}"


def temp_sibling(target: Path) -> Path:
    """`.NAME.tmp-partial` beside `target`: where a save of `target` is written before its rename."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL}")


def old_sibling(target: Path) -> Path:
    """`.NAME.old` beside `target`: an earlier save of the same name while it is replaced."""
    target = Path(target)
    return target.with_name(f".{target.name}{OLD}")


def _is_stale_save(path: Path) -> bool:
    """A temporary or old sibling of a checkpoint or final model (a save that did not finish)."""
    name = path.name
    return (name.startswith((f".{CHECKPOINT_PREFIX}", f".{FINAL_MODEL}")) and path.is_dir()
            and (".tmp-" in name or name.endswith(OLD)))


def resolve_model_folder(path: str | Path) -> Path:
    """An mmloom model folder from a model folder, a `checkpoint-N` or a run folder (its
    final_model, else its newest complete checkpoint). Raises MmloomError naming `path` otherwise."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / FINAL_MODEL / "config.json").exists():
        return path / FINAL_MODEL
    latest = RunFolder(path).latest_checkpoint()
    if latest is not None:
        return latest
    raise MmloomError(f"{path}: no mmloom model, final_model or checkpoint-N folder there")


class CheckResult(Protocol):
    """What a checkpoint verification returns (:class:`mmloom.training.checkpoint.CheckpointCheck`)."""

    weights: list[str]
    state: list[str]

    def usable(self, weights_only: bool) -> bool: ...

    def describe(self, weights_only: bool = False) -> str: ...


@dataclass(frozen=True)
class RunFolder:
    """`MODEL_DIR` of one run (see the module docstring for its layout)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------- names
    def checkpoint(self, step: int) -> Path:
        """`MODEL_DIR/checkpoint-{step}`."""
        return self.path / checkpoint_name(step)

    @property
    def final_model(self) -> Path:
        return self.path / FINAL_MODEL

    @property
    def resolved_config(self) -> Path:
        return self.path / RESOLVED_CONFIG

    @property
    def eval_results(self) -> Path:
        return self.path / EVAL_RESULTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def reference_logps(self) -> Path:
        return self.path / REFERENCE_LOGPS

    # ----------------------------------------------------------------------------- listing
    def checkpoints(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        """(step, folder) of the `checkpoint-N` folders, oldest first: those holding
        `trainer_state.json`, or every one with `complete_only=False` (to report the others)."""
        found = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                match = CHECKPOINT_RE.match(p.name)
                if match and p.is_dir() and (not complete_only or (p / TRAINER_STATE).exists()):
                    found.append((int(match.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        checkpoints = self.checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def resume_point(self, verify: Callable[[Path], CheckResult],
                     weights_only: bool = False) -> tuple[Path | None, list[str]]:
        """The newest usable checkpoint (None when there is none at all) and notes on the newer ones
        skipped. `verify` checks one checkpoint folder (:func:`mmloom.training.checkpoint.verify_checkpoint`),
        so this module never reads a checkpoint's contents; with `weights_only` a checkpoint whose
        optimizer or RNG state is damaged is usable. Raises MmloomError when checkpoints exist but none
        is usable."""
        notes, checks = [], []
        for _, folder in reversed(self.checkpoints(complete_only=False)):
            check = verify(folder)
            if check.usable(weights_only):
                if weights_only and check.state:
                    notes.append(f"{folder.name}: resuming from its weights only "
                                 f"(runconfig.resume_weights_only; {'; '.join(check.state[:2])})")
                return folder, [*(f"skipped {c.describe(weights_only)}" for c in checks), *notes]
            checks.append(check)
        if not checks:
            return None, []
        lines = "; ".join(c.describe(weights_only) for c in checks)
        hint = ("; if only the optimizer/RNG state is damaged, set runconfig.resume_weights_only=true to continue "
                "from the weights" if any(not c.weights for c in checks) and not weights_only else "")
        raise MmloomError(f"no usable checkpoint in {self.path} ({lines}); move the damaged checkpoint folders "
                          f"away to start the run afresh{hint}")

    # ----------------------------------------------------------------------------- writing
    @property
    def writing(self) -> bool:
        """Whether this process holds the folder's exclusive lock (:meth:`lock` in a training mode)."""
        return self.path.resolve() in _WRITERS

    def remove_stale_saves(self) -> list[Path]:
        """Remove what interrupted saves left (`.checkpoint-N.tmp-partial`, `.final_model.old`, ...;
        nothing else) and return it. Only the run's writer may: raises MmloomError unless this
        process holds the exclusive lock (an evaluation sharing the folder must leave a running
        trainer's saves alone)."""
        if not self.writing:
            raise MmloomError(f"{self.path}: only the run folder's writer (the trainer holding its lock) removes "
                              "the folders of interrupted saves")
        stale = sorted(p for p in self.path.glob(".*") if _is_stale_save(p)) if self.path.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def prune(self, keep_last: int) -> list[Path]:
        """Remove all but the newest `keep_last` complete checkpoints; returns those removed."""
        removed = [folder for _, folder in self.checkpoints()[:-keep_last]] if keep_last > 0 else []
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
        return removed

    def write_resolved_config(self, text: str) -> None:
        """`resolved_config.yaml` (atomic; a full disk is one line naming the file and its size)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with disk_full_as_error(self.resolved_config, len(text.encode()) + 4096):
            write_text(self.resolved_config, text)

    def write_eval_results(self, results: dict[str, Any]) -> None:
        """`eval_results.json` (atomic; a full disk is one line naming the file)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with disk_full_as_error(self.eval_results, 2**16):
            write_json(self.eval_results, results)

    # ----------------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def lock(self, ctx: DistContext, mode: str = "train") -> Iterator[None]:
        """Hold the folder's lock (the folder is created if needed) for the block: shared for `mode`
        ``"eval"``, exclusive otherwise. Collective under torchrun (rank 0 holds it). Raises
        MmloomError (:class:`mmloom.outputs.FolderInUse`) on every rank when another process holds a
        conflicting lock."""
        hint = ("wait for it to finish, or evaluate its checkpoint from another --model-dir "
                "(--set runconfig.checkpoint_path=CHECKPOINT)" if mode == "eval"
                else "wait for it to finish, or train into another --model-dir")
        lock = FolderLock(self.path, what="run folder", shared=mode == "eval", hint=hint)
        key = None

        def acquire() -> None:
            lock.acquire()

        ctx.on_main(acquire)
        if ctx.is_main and mode != "eval":
            key = self.path.resolve()
            _WRITERS.add(key)
        try:
            yield
        finally:
            if key is not None:
                _WRITERS.discard(key)
            if ctx.is_main:
                lock.release()
