"""``zo2-train`` with test hooks, set by environment variables (tests only).

    python tests/train_with.py <zo2-train overrides>
    torchrun ... tests/train_with.py <zo2-train overrides>

The run is :func:`zo2.train.run` on the config ``zo2-train`` composes from the same
overrides (without ``output_dir``, in the directory zo2-train would choose), with the
engine and callbacks injected through the trainer's constructor.

``ZO2_TEST_EMULATE_DP=N``: the run's engine computes each step's losses as N
data-parallel ranks do (``dist_job.EmulatedDP``): the one-process reference that a
data-parallel run must equal bit for bit.

``ZO2_TEST_KILL=checkpoint:N`` (right after checkpoint N is published, on every rank
past the save's last barrier) or ``step:N`` (right after step N is computed and logged,
before its evaluation and checkpoint): the process sends itself
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

from zo2.trainer import Callback  # noqa: E402


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


class KillAt(Callback):
    """Kill this process right after checkpoint N is published or step N is computed."""

    def __init__(self, where: str, at: int) -> None:
        if where not in ("checkpoint", "step"):
            raise ValueError(f"ZO2_TEST_KILL={where}:{at}: checkpoint:N or step:N")
        self.where, self.at = where, at

    def on_step(self, trainer, result) -> None:
        if self.where == "step" and result.step + 1 == self.at:  # step counts from 0
            _die()

    def on_save(self, trainer, step, folder) -> None:
        if self.where == "checkpoint" and step == self.at:
            _die()


def main(argv: list[str]) -> int:
    """zo2-train's run with the engine and callbacks these variables ask for; errors as
    the CLI reports them (``error: ...``, exit status 2)."""
    from zo2.config import compose
    from zo2.engine import ZOEngine
    from zo2.errors import ZO2Error
    from zo2.train import run

    dp = int(os.environ.get("ZO2_TEST_EMULATE_DP", "1"))
    engine = ZOEngine
    if dp > 1:
        import dist_job

        engine = type("EmulatedDP", (dist_job.EmulatedDP,), {"dp": dp})
    kill = os.environ.get("ZO2_TEST_KILL")
    callbacks = []
    if kill and _armed():
        where, at = kill.split(":")
        callbacks.append(KillAt(where, int(at)))
    from zo2.launch.train import default_run_dir

    try:
        cfg = compose(argv)
        run(cfg, cfg.output_dir or default_run_dir(), callbacks=callbacks,
            engine_factory=engine)
    except ZO2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
