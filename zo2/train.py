"""``run(cfg, output_dir)``: what every launcher calls; one :class:`~zo2.trainer.Trainer`.

The run itself (building, the loop, evaluation, checkpoints, the files written) is
documented in :mod:`zo2.trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from zo2.config import TrainConfig
from zo2.engine import ZOEngine
from zo2.trainer import Callback, Trainer


def run(cfg: TrainConfig, output_dir: str | Path, callbacks: Sequence[Callback] = (),
        engine_factory: Callable[..., ZOEngine] = ZOEngine) -> dict:
    """Fine-tune as configured; returns the summary (also written to summary.json).

    With ``cfg.checkpoint.resume`` (default ``auto``) a run whose output directory
    holds checkpoints continues from the newest valid one, exactly where it stopped.
    ``callbacks`` (e.g. Ray Train's reporter) observe steps, evaluations and saves.
    """
    with Trainer(cfg, output_dir, callbacks=callbacks, engine_factory=engine_factory) as trainer:
        return trainer.train()
