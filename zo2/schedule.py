"""Learning-rate schedules: constant, linear or cosine decay, with linear warmup."""

from __future__ import annotations

import math

from zo2.choices import SCHEDULES
from zo2.errors import ConfigError


def learning_rate(step: int, *, lr: float, schedule: str = "constant", warmup_steps: int = 0,
                  total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The learning rate of (0-based) ``step``.

    Warmup rises linearly from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps``;
    ``linear`` and ``cosine`` then decay to ``min_ratio*lr`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_ratio + (1.0 - min_ratio) * factor)
