"""Numerical faults: NaN / inf losses are skipped and counted; too many in a row stop the
run with a clear message, keeping the last good checkpoint, from which it resumes.

The fault is injected where it arises in practice, in the model's output: an engine
whose logits turn NaN at chosen steps (evaluation is left intact).
"""

from __future__ import annotations

import json
import math

import pytest

from zo2.config import compose
from zo2.engine import ZOEngine
from zo2.errors import TrainingError
from zo2.train import run

ARGS = ["model=tiny-llama", "steps=8", "eval_every=0", "log_every=1", "optim.lr=1e-3",
        "checkpoint.every=2", "task.n_train=24", "task.n_dev=12", "task.n_test=12",
        "task.max_length=48", "optim.batch_size=4", "eval_batch_size=12", "progress=false",
        "logging=none"]


def faulty_engine(bad_steps: set[int]) -> type:
    class Faulty(ZOEngine):
        def _stacked_logits(self, batch, plan):
            logits = super()._stacked_logits(batch, plan)
            # step_index counts finished steps: step k of the run is index k-1
            return logits.fill_(math.nan) if self.step_index + 1 in bad_steps else logits
    return Faulty


def _records(out, event):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_a_few_nan_steps_are_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    summary = run(compose([*ARGS, f"output_dir={out}"]), out,
                  engine_factory=faulty_engine({3, 4}))
    assert summary["skipped_steps"] == 2
    skipped = [r["step"] for r in _records(out, "step") if r["skipped"]]
    assert skipped == [3, 4]
    assert all(math.isfinite(r["loss"]) for r in _records(out, "step") if not r["skipped"])


def test_too_many_in_a_row_stop_and_the_last_good_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = compose([*ARGS, "nonfinite_limit=3", f"output_dir={out}"])
    with pytest.raises(TrainingError, match=r"3 steps in a row \(to step 7\).*step-00000004"):
        run(cfg, out, engine_factory=faulty_engine({5, 6, 7, 8}))
    # No checkpoint was written during the streak (step 6 was due): step 4 is the last.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]
    assert _records(out, "stopped")[0]["step"] == 7
    assert not (out / "summary.json").exists()

    summary = run(cfg, out, engine_factory=ZOEngine)  # the fault is gone: resume
    assert summary["resumed_from"].endswith("step-00000004")
    assert summary["skipped_steps"] == 0  # the skipped steps were redone from step 4
    assert [r["step"] for r in _records(out, "step")] == list(range(1, 9))
