"""Update rules and estimators (zo2/rules.py): each lowers the loss on a tiny model, runs
bit-identically with offloading on, keeps the state it says it keeps, and resumes exactly
from a checkpoint (its moments saved with the weights)."""

from __future__ import annotations

import math

import pytest
import torch
from _objectives import Ascent
from conftest import make_batch, make_model

from zo2.config import OffloadConfig, OptimConfig
from zo2.engine import ZOEngine
from zo2.loss import Objective
from zo2.rules import HistoryMomentum, Momentum, make_rule, state_bytes

LABELS = torch.tensor([5, 9])
STEPS = 30

# (method settings, lr): each rule at a step size that suits it on the tiny model.
RULES = {
    "zo-sgd": ({}, 5e-3),
    "zo-momentum": ({"momentum": 0.9}, 1e-3),
    "zo-momentum-history": ({"method": "zo-momentum", "momentum": 0.9, "history": 4}, 1e-3),
    "zo-adam": ({}, 2e-3),
    "zo-adam-bf16": ({"method": "zo-adam", "state_dtype": "bfloat16"}, 2e-3),
    "zo-sign": ({}, 2e-4),
    # residual feedback: the update's own loss change enters the next estimate divided by
    # eps, so it needs lr << eps / g^2 (at eps=1e-3 and lr=1e-3 it diverges)
    "one-point": ({"estimator": "one-point", "eps": 1e-2}, 3e-4),
    "n-spsa-q4": ({"q": 4}, 5e-3),
    # the step is lr * (L_j - L_0) / spread: O(lr) per direction, not O(lr * g)
    "fzoo": ({"estimator": "fzoo", "q": 4, "direction": "rademacher"}, 2e-4),
    "conservative": ({"conservative": True}, 5e-3),
    # sparse and low-rank directions (zo2/directions.py): ZO-SGD on a materialized G
    "sparse": ({"sparsity": 0.75}, 5e-3),
    "low-rank": ({"rank": 2}, 5e-3),
    "sparse-adam": ({"method": "zo-adam", "sparsity": 0.5}, 2e-3),
    "low-rank-momentum": ({"method": "zo-momentum", "rank": 1}, 1e-3),
    # HiZOO (zo2/hessian.py), with a smoothing large enough that D moves within the test
    "hizoo": ({"estimator": "hizoo", "hessian": "diagonal", "hessian_smooth": 0.1}, 5e-3),
    "hizoo-light": ({"estimator": "hizoo", "hessian": "factored", "hessian_smooth": 0.1}, 5e-3),
    "hizoo-light-adam": ({"method": "zo-adam", "estimator": "hizoo", "hessian": "factored",
                          "hessian_smooth": 0.1, "q": 2}, 2e-3),
}


def _optim(name: str, **extra) -> OptimConfig:
    settings, lr = RULES[name]
    settings = {"method": name if name in ("zo-sgd", "zo-momentum", "zo-adam", "zo-sign")
                else "zo-sgd", **settings}
    return OptimConfig(lr=lr, **{"eps": 1e-3, **settings}, **extra)


def _engine(model, optim: OptimConfig, objective: type = Objective, **kw) -> ZOEngine:
    return ZOEngine(model, optim, objective("label_words", candidates=LABELS), seed=1,
                    total_steps=STEPS, **kw)


def _params(engine: ZOEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.export_state_dict().items()}


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_lowers_the_loss(name):
    batch = make_batch(batch=8)
    ends = []
    for objective in (Objective, Ascent):  # the real loss, and its negation (_objectives.py)
        engine = _engine(make_model("llama"), _optim(name), objective)
        sign = 1.0 if objective is Objective else -1.0
        start = sign * engine.evaluate([batch])["loss"]
        for _ in range(STEPS):
            engine.step(batch)
        ends.append(sign * engine.evaluate([batch])["loss"])
    descent, ascent = ends
    assert descent < start < ascent, (name, descent, start, ascent)


@pytest.mark.parametrize("name", ["zo-momentum", "zo-adam", "zo-sign", "zo-momentum-history",
                                  "one-point", "conservative", "fzoo", "sparse", "low-rank",
                                  "sparse-adam", "low-rank-momentum", "hizoo-light",
                                  "hizoo-light-adam"])
def test_offloaded_equals_resident(name):
    batches = [make_batch(seed=i) for i in range(3)]
    results = []
    for offload in (None, OffloadConfig(enabled=True, ring=1)):
        engine = _engine(make_model("opt", layers=3), _optim(name), offload=offload)
        losses = [engine.step(batches[i % 3]).loss for i in range(6)]
        results.append((losses, _params(engine)))
    (la, wa), (lb, wb) = results
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", ["zo-sign", "zo-momentum", "zo-adam", "sparse", "low-rank",
                                  "hizoo", "hizoo-light"])
def test_chunked_updates_equal_one_pass(name, monkeypatch):
    """Materialized rules update CHUNK elements at a time, and structured directions
    perturb CHUNK elements at a time; chunk boundaries inside every parameter (and its
    state; 1000 is not a multiple of any row length here) change no bit."""
    from zo2 import directions, rules

    runs = []
    for chunk in (rules.CHUNK, 1000):
        monkeypatch.setattr(rules, "CHUNK", chunk)
        monkeypatch.setattr(directions, "CHUNK", chunk)
        engine = _engine(make_model("llama", layers=2), _optim(name, state_dtype="bfloat16")
                         if name != "zo-sign" else _optim(name))
        for i in range(3):
            engine.step(make_batch(seed=i))
        runs.append((_params(engine), engine.rule.state()))
    (wa, sa), (wb, sb) = runs
    assert max(p.numel() for p in wa.values()) > 1000  # the small chunk did cut parameters
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_history_momentum_equals_momentum_while_the_history_covers_the_run():
    """Both rules apply w -= lr sum_a beta^a g_{t-a} z_{t-a}; the buffer adds it up step
    by step, the history from the seeds: the same sum in another order. The history
    run is fed the buffer run's projected gradients (one log for both), so the weights
    differ by the two roundings only, bounded below from the arithmetic."""
    batches = [make_batch(seed=i) for i in range(5)]
    lr, beta, u = 1e-3, 0.9, 2.0**-24
    buffer = _engine(make_model("llama"), OptimConfig(method="zo-momentum", lr=lr,
                                                      momentum=beta))
    first = [buffer.step(b) for b in batches]
    history = _engine(make_model("llama"), OptimConfig(method="zo-momentum", lr=lr,
                                                       momentum=beta, history=5))
    history._projected_grads = lambda losses, plan: list(first[history.step_index].grads)
    second = [history.step(b) for b in batches]
    assert isinstance(make_rule(OptimConfig(method="zo-momentum", history=5)), HistoryMomentum)
    assert isinstance(make_rule(OptimConfig(method="zo-momentum")), Momentum)
    assert second[0].losses == first[0].losses  # the same weights at the first step
    assert [r.grads for r in second] == [r.grads for r in first]
    assert all(r.lr == lr for r in first)  # the default schedule's first 5 of 30 steps
    wa, wb = _params(buffer), _params(history)
    # Bound. z: |z| <= Z = sqrt(-2 ln 2^-24) (Box-Muller on 24-bit uniforms, see
    # test_noise). Momentum magnitude at step t: M_t = sum_a beta^a |g_{t-a}| Z; weights
    # |w| <= W = max|w_0| + lr sum_t M_t. History, step t: w + k_t fma's (k_t = t+1 terms),
    # each one rounding of a value <= W: k_t u W. Buffer, step t: beta m + G (2
    # roundings of <= M_t, and G = g z one more: the moment's error e_t <= beta e_{t-1}
    # + 3 u M_t), then w - lr m (2 roundings <= W): 2 u W + lr e_t. The updates do not
    # depend on w (the gradients are fed), so the errors add up over the steps.
    z_max = math.sqrt(-2 * math.log(2.0**-24)) + 1e-6
    g = [abs(r.grads[0]) for r in first]
    m = [sum(beta**a * g[t - a] * z_max for a in range(t + 1)) for t in range(len(g))]
    w_max = max(float(w.abs().max()) for w in wa.values()) + lr * sum(m)
    bound, e = 0.0, 0.0
    for t in range(len(g)):
        e = beta * e + 3 * u * m[t]
        bound += (t + 1) * u * w_max + 2 * u * w_max + lr * e
    gap = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert gap <= bound, (gap, bound)


@pytest.mark.parametrize("dtype,per_param", [("float32", 8), ("bfloat16", 4)])
def test_adam_keeps_two_buffers_of_the_state_dtype(dtype, per_param):
    engine = _engine(make_model("llama"), OptimConfig(method="zo-adam", state_dtype=dtype))
    engine.step(make_batch())
    engine.flush()
    numel = sum(p.numel for p in engine.params)
    state = engine.rule.state()
    assert sum(t.numel() * t.element_size() for t in state.values()) == numel * per_param
    assert state_bytes(engine.rule, numel) == numel * per_param
    assert state_bytes(make_rule(OptimConfig(method="zo-momentum", history=8)), numel) == 0


@pytest.mark.parametrize("name", ["zo-adam", "one-point", "sparse-adam", "low-rank", "hizoo",
                                  "hizoo-light-adam"])
def test_resume_from_a_checkpoint_is_exact(name, tmp_path):
    batches = [make_batch(seed=i) for i in range(6)]
    full = _engine(make_model("llama"), _optim(name))
    for b in batches:
        full.step(b)
    first = _engine(make_model("llama"), _optim(name))
    for b in batches[:3]:
        first.step(b)
    first.save(tmp_path / "ck")
    resumed = _engine(make_model("llama"), _optim(name))
    resumed.load(tmp_path / "ck")
    for b in batches[3:]:
        resumed.step(b)
    wa, wb = _params(full), _params(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_conservative_steps_never_raise_the_loss_on_their_batch():
    """Conservative ZO keeps w, the SGD step or its opposite, whichever has the least
    loss: on one fixed batch the loss cannot go up (up to the rounding of the update)."""
    batch = make_batch(batch=8)
    engine = _engine(make_model("llama"), OptimConfig(lr=5e-2, conservative=True))
    plain = _engine(make_model("llama"), OptimConfig(lr=5e-2))
    losses, plain_losses, taken = [engine.evaluate([batch])["loss"]], [], []
    for _ in range(12):
        taken.append(engine.step(batch).telemetry["conservative_coef"])
        losses.append(engine.evaluate([batch])["loss"])
        plain.step(batch)
        plain_losses.append(plain.evaluate([batch])["loss"])
    assert all(b <= a + 1e-5 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]
    assert any(c != 0.0 for c in taken)
    # at this large lr plain ZO-SGD is not monotone on the batch; conservative ends lower
    assert losses[-1] <= min(plain_losses) + 1e-5


def test_conservative_needs_a_single_seed_sgd_step():
    from zo2.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.conservative"):
        _engine(make_model("llama"), OptimConfig(conservative=True, q=2))
