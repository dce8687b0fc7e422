"""Preemption: SIGTERM (what cluster schedulers send before killing a job) and Ctrl-C (SIGINT)
stop a training run at the next step boundary, after a checkpoint, instead of losing the steps
since the last one.

The trainer asks `StopSignals.agreed(ctx)` after every optimizer step: every rank learns whether
any rank received a signal (one all-reduce of a flag), so all ranks save the same checkpoint and
stop together. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.
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

    def agreed(self, ctx) -> int | None:
        """The signal number when this rank or any other received one (collective when distributed), else None."""
        if not ctx.distributed:
            return self.received
        if float(ctx.all_reduce_sum([1.0 if self.received else 0.0])[0]) == 0:
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
