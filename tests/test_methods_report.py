"""bench.methods_report: how runs of a budget and runs at equal wall time are summarised
(the figures of issue 17 come from these rules)."""

from __future__ import annotations

import pytest

from bench import methods_report
from bench.methods import default_method


def run(points: list[tuple[int, float]], cut_short: bool, **extra) -> dict:
    return {"curve": [{"forward_passes": fp, "test_accuracy": acc} for fp, acc in points],
            "cut_short": cut_short, "forwards_reached": points[-1][0],
            "peak_rss_mb": 1000.0, **extra}


def test_a_budget_record_takes_its_final_over_the_seeds_that_ran_the_whole_budget():
    runs = {"0": run([(0, 0.5), (200, 0.6), (390, 0.7)], cut_short=True),
            "1": run([(0, 0.5), (200, 0.7), (400, 0.8)], cut_short=False),
            "2": run([(0, 0.5), (200, 0.6), (400, 0.6)], cut_short=False)}
    agg = methods_report.aggregate(runs)
    assert agg["final_over_seeds"] == [1, 2]
    assert agg["final_mean"] == pytest.approx(0.7, abs=1e-15)  # (0.8 + 0.6) / 2
    assert agg["cut_short_seeds"] == [0]


def test_an_equal_wall_time_record_takes_every_seed_at_its_time():
    runs = {"0": run([(0, 0.5), (450, 0.7), (820, 0.72)], cut_short=True, minutes=30.0),
            "1": run([(0, 0.5), (450, 0.7), (900, 0.76)], cut_short=False, minutes=30.0)}
    agg = methods_report.aggregate(runs)
    assert agg["final_over_seeds"] == [0, 1] and agg["final_forwards"] == [820, 900]
    assert agg["final_mean"] == pytest.approx(0.74, abs=1e-15)
    # sample sd of two values: |a - b| / sqrt(2)
    assert agg["final_sd"] == pytest.approx(0.04 / 2 ** 0.5, rel=1e-12)
    got = methods_report.wall_targets({"zo_sgd": {"aggregate": agg}}, "zo_sgd", 30.0)
    assert got["default_mean"] == agg["final_mean"] and not got["mean_met"]
    assert got["sd_met"] is False  # 0.028 > 0.02
    assert "missing" in methods_report.wall_targets({}, "zo_sgd", 30.0)


def test_runs_of_another_wall_time_or_budget_are_not_merged():
    old = {"setup": {"budget_forward_passes": 900, "n_test": 500, "n_train": 1000,
                     "minutes_per_run": 30.0}}
    methods_report.check_same_protocol(old, 900, 500, 1000, 30.0)
    with pytest.raises(SystemExit, match="minutes_per_run"):
        methods_report.check_same_protocol(old, 900, 500, 1000, None)
    with pytest.raises(SystemExit, match="budget_forward_passes"):
        methods_report.check_same_protocol(old, 400, 500, 1000, 30.0)


def test_the_default_method_is_the_one_zo2_train_runs():
    assert default_method() == "zo_sgd"  # configs/train.yaml: optim: mezo, as shipped
