"""The divergence guard: a run whose loss climbs far above its start stops with one line."""

from __future__ import annotations

import json

import pytest
from _chat import chat_files

from zo2.config import GuardConfig, compose
from zo2.errors import ConfigError, TrainingError
from zo2.guard import DivergenceGuard
from zo2.trainer import Trainer


def feed(guard: DivergenceGuard, losses) -> list:
    return [guard.observe(step, loss) for step, loss in enumerate(losses, start=1)]


def test_the_rule_compares_the_running_mean_with_the_first_loss():
    guard = DivergenceGuard(factor=4.0, window=3, margin=1.0)  # first 2.0: bound 8.0
    assert feed(guard, (2.0, 5.0, 7.0, 11.0)) == [None] * 4  # means 4.67, 7.67
    assert guard.left_at == 4 and guard.out_of_bounds  # 11 > 8
    assert guard.observe(5, 12.0) == 10.0  # (7 + 11 + 12) / 3: diverged
    # the loss of step 4 is of the weights after step 3: checkpoints up to step 2 are sane
    assert [guard.sane_checkpoint(s) for s in (1, 2, 3, 4)] == [True, True, False, False]
    low = DivergenceGuard(factor=4.0, window=2, margin=1.0)  # first 0.01: bound 1.01
    assert feed(low, (0.01, 0.2, 0.3)) == [None] * 3 and low.left_at is None  # 30x, < 1 nat
    assert low.sane(4.0, 1.0) and not low.sane(4.5, 1.0) and low.sane(99.0, None)
    off = DivergenceGuard(factor=0)
    assert feed(off, (1.0, 1e9, 1e12)) == [None] * 3 and off.sane(1e9, 1.0)


def test_the_bound_is_exact_at_the_edge():
    guard = DivergenceGuard(factor=4.0, window=2, margin=1.0)  # bound 8.0
    assert feed(guard, (2.0, 6.0, 10.0)) == [None, None, None]  # means 4.0, 8.0 (not above)
    assert guard.observe(4, 10.5) == 10.25


def test_the_guard_state_resumes():
    guard = DivergenceGuard(factor=4.0, window=3)
    feed(guard, (2.0, 12.0))
    again = DivergenceGuard(factor=4.0, window=3)
    again.load_state_dict(guard.state_dict())
    assert again.observe(3, 12.0) == guard.observe(3, 12.0) == pytest.approx(26 / 3)
    assert again.left_at == guard.left_at == 2


def test_guard_settings_are_checked():
    with pytest.raises(ConfigError, match="guard.factor: must be 0 .off. or > 1"):
        GuardConfig(factor=0.5)
    with pytest.raises(ConfigError, match="guard.window: must be >= 1"):
        GuardConfig(window=0)


def test_a_tiny_model_at_100x_its_working_lr_stops_within_a_few_steps(tmp_path):
    """tiny-llama trains at optim.lr=1e-3 (the tests' working lr); at 1e-1 the run stops
    with one line naming the lr and eps and what to try, keeps its checkpoints, writes no
    final/, and best/ is a sane step."""
    files = chat_files(tmp_path, 24)
    out = tmp_path / "run"
    cfg = compose(["model=tiny-llama", "optim.lr=1e-1", "optim.batch_size=4", "steps=40",
                   "eval_every=2", "checkpoint.every=1", "checkpoint.keep=50", "eval_batch_size=8",
                   "progress=false", "logging=none", "data.max_length=96",
                   "data.format=messages", f"output_dir={out}",
                   *(f"data.{k}={v}" for k, v in files.items())])
    with pytest.raises(TrainingError) as caught, Trainer(cfg, out) as trainer:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "training diverged at step" in message
    assert "optim.lr=0.1 and optim.eps=0.001; try optim.lr=0.01" in message
    left_at = trainer.guard.left_at
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert kept and all(step < left_at for step in kept)  # none written once the loss left
    sane = [step for step in kept if step < left_at - 1]  # weights whose loss was seen
    expected = f"checkpoints/step-{sane[-1]:08d}" if sane else "sane checkpoint is none"
    assert expected in message and f"left its bound at step {left_at}" in message
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped = [r for r in records if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "diverged"
    assert stopped[0]["step"] <= 10  # within a few steps of the window
    assert not (out / "final").exists()
    zero = next(r for r in records if r["event"] == "eval" and r["step"] == 0)["dev"]["loss"]
    evals = {r["step"]: r["dev"]["loss"] for r in records if r["event"] == "eval"}
    best = json.loads((out / "best" / "MANIFEST.json").read_text()).get("step")
    assert best is None or evals[best] <= max(4 * zero, zero + 1)
