"""Learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from zo2.errors import ConfigError
from zo2.schedule import learning_rate


def test_constant_with_warmup():
    lrs = [learning_rate(s, lr=1.0, warmup_steps=4, total_steps=10) for s in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4:] == [1.0] * 6


def close(x: float):
    """The same real value computed in another order: a few (<= 8) double roundings of
    magnitudes <= |x|, so within 8 * 2^-53 relative, not a guessed 1e-6."""
    return pytest.approx(x, rel=8 * 2.0**-53, abs=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_reaches_the_floor_at_the_horizon(schedule):
    kw = dict(lr=2.0, schedule=schedule, total_steps=100, min_ratio=0.1)
    assert learning_rate(0, **kw) == close(2.0)
    assert learning_rate(50, **kw) == close(2.0 * (0.1 + 0.9 * 0.5))
    assert learning_rate(100, **kw) == close(0.2)
    assert learning_rate(500, **kw) == close(0.2)
    lrs = [learning_rate(s, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_shape():
    quarter = learning_rate(25, lr=1.0, schedule="cosine", total_steps=100)
    assert quarter == close(0.5 * (1 + math.cos(math.pi / 4)))


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="optim.schedule"):
        learning_rate(0, lr=1.0, schedule="step")
