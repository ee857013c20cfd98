"""``zo2-train`` with test hooks, set by environment variables (tests only).

    python tests/train_with.py <zo2-train overrides>
    torchrun ... tests/train_with.py <zo2-train overrides>

``ZO2_TEST_EMULATE_DP=N``: the run's engine computes each step's losses as N
data-parallel ranks do (``dist_job.EmulatedDP``): the one-process reference that a
data-parallel run must equal bit for bit.

``ZO2_TEST_KILL=checkpoint:N`` (right after checkpoint N is published, on every rank
past the save's last barrier) or ``step:N`` (right after step N's forwards and update
computation, before the loop sees it): the process sends itself
``ZO2_TEST_KILL_SIGNAL`` (``KILL``, the default, or ``STOP``: alive but silent), on the
rank ``ZO2_TEST_KILL_RANK`` only (default: any), and only in a launcher's first attempt
(``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restarted job runs through. Just
before the signal it writes ``<pid> <time.time()>`` to ``ZO2_TEST_KILL_MARK`` if set.
A deterministic kill point, where polling the checkpoint folder from outside would race
with the run (``checkpoint.keep`` deletes old checkpoints a few steps later).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _armed() -> bool:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank = os.environ.get("ZO2_TEST_KILL_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def _die() -> None:
    mark = os.environ.get("ZO2_TEST_KILL_MARK")
    if mark:
        Path(mark).write_text(f"{os.getpid()} {time.time()!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("ZO2_TEST_KILL_SIGNAL", "KILL")))


def install() -> None:
    import zo2.checkpoints
    import zo2.engine
    import zo2.train

    dp = int(os.environ.get("ZO2_TEST_EMULATE_DP", "1"))
    if dp > 1:
        import dist_job

        zo2.train.ZOEngine = type("EmulatedDP", (dist_job.EmulatedDP,), {"dp": dp})
    kill = os.environ.get("ZO2_TEST_KILL")
    if not kill or not _armed():
        return
    where, at = kill.split(":")
    at = int(at)
    if where == "checkpoint":
        save = zo2.checkpoints.CheckpointManager.save

        def save_then_die(self, step, write):
            final = save(self, step, write)
            if step == at:
                _die()
            return final

        zo2.checkpoints.CheckpointManager.save = save_then_die
    elif where == "step":
        step = zo2.engine.ZOEngine.step

        def step_then_die(self, *args, **kwargs):
            result = step(self, *args, **kwargs)
            if self.step_index == at:  # counts finished steps: step ``at`` of the run
                _die()
            return result

        zo2.engine.ZOEngine.step = step_then_die
    else:
        raise ValueError(f"ZO2_TEST_KILL={kill!r}: checkpoint:N or step:N")


if __name__ == "__main__":
    install()
    from zo2.launch.train import main

    main()
