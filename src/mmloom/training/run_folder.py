"""The run folder of `mmloom train` (`--model-dir`): one writer at a time.

A run folder holds one run: its checkpoints, metrics, TensorBoard events and final model. Two
trainers writing it would interleave checkpoints and metrics of different runs, and an evaluation
that cleaned up the trainer's temporary folders would break the trainer's next save. So every
`mmloom train` holds the run folder's lock (:class:`mmloom.outputs.FolderLock`, an `flock` on
`MODEL_DIR/.mmloom.lock` that the kernel releases when the process ends, however it ends) for as
long as it runs:

- training (`--mode train`, `train_and_eval`) takes it exclusively, before anything in the folder is
  read or changed; a second trainer or an evaluation is refused in one line naming the holder's
  command, PID and host;
- evaluation (`--mode eval`) shares it with other evaluations (it reads the newest checkpoint and
  writes `eval_results.json`) and never touches a trainer's temporary folders.

Under torchrun, rank 0 takes the lock and every rank learns the outcome (one refusal on each rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mmloom.outputs import FolderLock
from mmloom.training.distributed import DistContext


@contextlib.contextmanager
def run_folder_lock(model_dir: str | Path, ctx: DistContext, mode: str = "train") -> Iterator[None]:
    """Hold the lock of the run folder `model_dir` (created if needed) for the block: shared for
    `mode` ``"eval"``, exclusive otherwise. Collective under torchrun. Raises MmloomError
    (:class:`mmloom.outputs.FolderInUse`) on every rank when another process holds a conflicting lock."""
    hint = ("wait for it to finish, or evaluate its checkpoint from another --model-dir "
            "(--set runconfig.checkpoint_path=CHECKPOINT)" if mode == "eval"
            else "wait for it to finish, or train into another --model-dir")
    lock = FolderLock(model_dir, what="run folder", shared=mode == "eval", hint=hint)

    def acquire() -> None:
        lock.acquire()

    ctx.on_main(acquire)
    try:
        yield
    finally:
        if ctx.is_main:
            lock.release()
