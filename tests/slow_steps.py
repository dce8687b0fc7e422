"""`mmloom` with every optimizer step slowed down, for tests that stop a run in the middle (a kill,
SIGTERM, Ctrl-C) and must catch it between two given steps on a loaded machine:

    python tests/slow_steps.py SECONDS train CONFIG --model-dir DIR ...
    python -m torch.distributed.run --nproc_per_node=2 tests/slow_steps.py SECONDS train ...

Each step of `Trainer.optimizer_step` is followed by a sleep of SECONDS; everything else is
`mmloom`'s command line as it is (exit code included).
"""

from __future__ import annotations

import sys
import time

from mmloom.cli.main import main
from mmloom.training.loop import Trainer


def slow_down(seconds: float) -> None:
    """Make `Trainer.optimizer_step` sleep `seconds` after each step."""
    step = Trainer.optimizer_step

    def slow_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        time.sleep(seconds)
        return result

    Trainer.optimizer_step = slow_step


if __name__ == "__main__":
    slow_down(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
