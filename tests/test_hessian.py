"""HiZOO's Hessian-scaled directions (zo2/hessian.py, optim.estimator=hizoo): the
curvature it measures, the running estimate D it keeps (diagonal and factored), the
directions it scales by D, and the settings it refuses.

The loss falling, offloaded == resident, chunking and resume are in test_rules.py,
seed-log replay in test_seedlog.py, PertP / data parallel / sliced in test_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model

from zo2 import noise
from zo2.config import OffloadConfig, OptimConfig
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.estimators import make_estimator
from zo2.loss import Objective

ALPHA, EPS = 0.1, 1e-3


def _engine(hessian: str, **kw) -> ZOEngine:
    optim = OptimConfig(lr=5e-3, eps=EPS, estimator="hizoo", hessian=hessian,
                        hessian_smooth=ALPHA, **kw)
    return ZOEngine(make_model("llama"), optim,
                    Objective("label_words", candidates=torch.tensor([5, 9])), seed=1,
                    total_steps=4)


def _factor(p, record) -> torch.Tensor:
    """1 - alpha + alpha * mean_j kappa_j n_j^2, with the operations of zo2/hessian.py."""
    total = torch.zeros(p.numel)
    q = len(record["curv"])
    for seed, kappa in zip(record["seeds"], record["curv"]):
        n = noise.fill(torch.empty(p.numel), seed, p.key, 0, "gaussian")
        total.add_(n.mul_(n).mul_(kappa / q))
    return total.mul_(ALPHA).add_(1.0 - ALPHA)


def test_the_estimator_measures_gradient_and_curvature_around_a_baseline():
    hizoo = make_estimator("hizoo")
    plan = hizoo.plan([11, 12], EPS)
    assert [(s.seed, s.sign) for s in plan.slices] == [(None, 0), (11, 1), (11, -1),
                                                        (12, 1), (12, -1)]
    losses = [1.0, 1.5, 0.75, 0.5, 1.25]
    assert hizoo.grads(losses, 0.5) == [0.75, -0.75]
    # |L+ + L- - 2 L0| / (2 eps^2): 0.25 / 0.5 and |-0.25| / 0.5
    assert hizoo.curvatures(losses, 0.5) == [0.5, 0.5]


def test_diagonal_d_follows_the_rule_and_scales_the_next_directions():
    engine = _engine("diagonal")
    result = engine.step(make_batch(seed=0))
    l0, plus, minus = result.losses
    record = engine.log[-1]
    assert record["curv"] == [abs(plus + minus - 2 * l0) / (2 * EPS * EPS)]
    assert record["curv"][0] > 0
    engine.flush()  # applies the update: advances D, then steps along n / sqrt(D)
    scaled = engine.directions
    for p in engine.params:
        d = scaled.diag[p.name]
        assert torch.equal(d, torch.ones(p.numel).mul_(_factor(p, record))), p.name
        # the next step's direction of p: the noise over sqrt(D), element for element
        z = torch.empty(p.numel)
        scaled.fill(z, 77, p, 0, p.param.data.reshape(-1))
        n = noise.fill(torch.empty(p.numel), 77, p.key, 0, "gaussian")
        assert torch.equal(z, n / d.sqrt())
    assert any((scaled.diag[p.name] != 1).any() for p in engine.params)


def test_factored_d_keeps_the_row_and_column_sums_of_the_diagonal_one():
    diagonal, factored = _engine("diagonal"), _engine("factored")
    batch = make_batch(seed=0)
    a, b = diagonal.step(batch), factored.step(batch)
    assert a.losses == b.losses  # D = 1 in both before the first update
    diagonal.flush()
    factored.flush()
    for p in factored.params:
        d = diagonal.directions.diag[p.name]
        if p.param.dim() < 2:  # vectors keep their diagonal in both variants
            assert torch.equal(factored.directions.diag[p.name], d)
            continue
        rows, cols = factored.directions.factors[p.name]
        full = d.view(p.param.shape[0], -1)
        assert torch.equal(rows, full.sum(1)) and torch.equal(cols, full.sum(0))
        # and the reconstruction R_i C_j / sum(R) is what the directions read
        want = (rows[:, None] * cols[None, :]).div_(rows.sum()).view(-1)
        assert torch.equal(factored.directions.curvature(p, 0, p.numel, torch.device("cpu")),
                           want)
    assert sum(t.numel() for t in factored.directions.tensors().values()) < \
        sum(t.numel() for t in diagonal.directions.tensors().values()) / 4


def test_settings_that_cannot_work_are_one_clear_error():
    with pytest.raises(ConfigError, match="optim.hessian"):
        OptimConfig(estimator="hizoo").check()
    with pytest.raises(ConfigError, match="optim.hessian"):
        OptimConfig(hessian="diagonal").check()
    with pytest.raises(ConfigError, match="choose one kind of directions"):
        OptimConfig(estimator="hizoo", hessian="factored", rank=2).check()
    with pytest.raises(ConfigError, match="optim.history"):
        OptimConfig(method="zo-momentum", history=2, estimator="hizoo",
                    hessian="factored").check()
    with pytest.raises(ConfigError, match="use optim.hessian=factored"):
        ZOEngine(make_model("opt"), OptimConfig(estimator="hizoo", hessian="diagonal"),
            Objective("label_words", candidates=torch.tensor([5, 9])),
            offload=OffloadConfig(enabled=True))
