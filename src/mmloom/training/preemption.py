"""Preemption: SIGTERM (what cluster schedulers send before killing a job) and Ctrl-C (SIGINT)
stop a training run at the next step boundary, after a checkpoint, instead of losing the steps
since the last one.

The trainer asks `StopSignals.agreed(ctx)` after every optimizer step: every rank learns whether
any rank received a signal (one all-reduce of a flag), so all ranks save the same checkpoint and
stop together. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint. A write
of the step that failed on one rank (metrics.jsonl on a full disk) is agreed on in the same
all-reduce: every rank raises `StepFailure` and the trainer stops together, after a checkpoint.
"""

from __future__ import annotations

import signal
import threading

from mmloom.errors import MmloomError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(MmloomError):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number
    (the shell's convention), so schedulers see that the job did not finish."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StepFailure(MmloomError):
    """A write of the last step failed on some rank (e.g. metrics.jsonl on a full disk); raised on
    every rank at the step boundary with that rank's message."""


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT only record that a stop was asked for (the
    previous handlers come back on exit). Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def agreed(self, ctx, failure: BaseException | None = None) -> int | None:
        """The signal number when this rank or any other received one (collective when distributed), else None.
        Raises StepFailure on every rank when any rank passes a `failure` (the first rank's message)."""
        if not ctx.distributed:
            if failure is not None:
                raise StepFailure(str(failure))
            return self.received
        flags = ctx.all_reduce_sum([1.0 if self.received else 0.0, 1.0 if failure is not None else 0.0])
        if float(flags[1]):
            messages = ctx.gather_objects(None if failure is None else str(failure)) or []
            raise StepFailure(ctx.broadcast_object(next((m for m in messages if m), "a write failed on another rank")))
        if float(flags[0]) == 0:
            return None
        return self.received or int(signal.SIGTERM)  # another rank's signal

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group, data-loader workers
    included; they ignore it (as the trainer only stops at the next step boundary and still needs
    their batches until then) and end when the trainer shuts its loader down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
