"""Sparse and low-rank directions (zo2/directions.py): the shape they promise, slices
equal to the whole, an unbiased (or masked) gradient estimate, masks that freeze what
they say in a real run, and one clear error for the settings that cannot work.

Offloaded == resident, chunking, resume and the loss falling are in test_rules.py,
seed-log replay in test_seedlog.py, parallel and sliced runs in test_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, make_model
from torch import nn

from zo2 import noise
from zo2.config import OffloadConfig, OptimConfig
from zo2.directions import LowRank, Sparse, make_directions
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.loss import Objective
from zo2.units import TrainableParam

U32 = 2.0**-24  # float32 unit roundoff


def _param(name: str, shape: tuple[int, ...], seed: int = 0) -> TrainableParam:
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(shape, generator=g) * 0.02, requires_grad=False)
    return TrainableParam(name, weight, noise.param_key(name), decay=len(shape) >= 2)


def _z(directions, p: TrainableParam, seed: int, start: int = 0, n: int | None = None):
    n = p.numel - start if n is None else n
    z = torch.empty(n)
    directions.fill(z, seed, p, start, p.param.data.reshape(-1)[start: start + n])
    return z


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_low_rank_z_has_rank_r_and_any_slice_equals_the_whole(dist):
    rank, p = 3, _param("layer.weight", (12, 10))
    lowrank = LowRank(dist, rank)
    whole = _z(lowrank, p, seed=7)
    # any slice, row-aligned or not, is bit-identical to the same elements of the whole
    for start, n in [(0, 1), (3, 17), (10, 10), (57, 63), (119, 1)]:
        assert torch.equal(_z(lowrank, p, 7, start, n), whole[start: start + n])
    # the factors, regenerated from their keys: z = U V^T / sqrt(r) up to the rounding
    # of r separately rounded products and r - 1 additions (and the 1/sqrt(r) scaling):
    # |error| <= gamma_{r+1} (|U| |V|^T)_ij / sqrt(r) elementwise (Higham 3.1), so by
    # Weyl's inequality sigma_{r+1}(z) <= ||error||_F
    key_u, key_v = lowrank._factor_keys(p)
    u = noise.fill(torch.empty(12 * rank), 7, key_u, 0, dist).view(12, rank).double()
    v = noise.fill(torch.empty(10 * rank), 7, key_v, 0, dist).view(10, rank).double()
    exact = u @ v.T / math.sqrt(rank)
    k = rank + 1
    bound = k * U32 / (1 - k * U32) * (u.abs() @ v.abs().T / math.sqrt(rank))
    z = whole.view(12, 10).double()
    assert ((z - exact).abs() <= bound).all()
    sigma = torch.linalg.svdvals(z)
    assert sigma[rank] <= bound.norm()
    assert sigma[rank - 1] > 100 * bound.norm()  # and it really has rank r
    # vectors and matrices too thin to factor get the dense noise
    bias = _param("layer.bias", (12,))
    assert torch.equal(_z(lowrank, bias, 7), noise.fill(torch.empty(12), 7, bias.key, 0, dist))
    thin = _param("thin.weight", (3, 40))
    assert torch.equal(_z(lowrank, thin, 7), noise.fill(torch.empty(120), 7, thin.key, 0, dist))


@pytest.mark.parametrize("kind", ["dense", "low-rank"])
def test_the_estimate_of_a_linear_loss_points_along_its_gradient(kind):
    """Invariant 1: for L(w) = <G, w>, the projected gradient along z is exactly <G, z>;
    the mean of <G, z> z over N seeds tends to E[z z^T] G = G (both kinds have
    E[z z^T] = I). Its squared error is about (d + 1) |G|^2 / N for dense Gaussian z
    (d = 120, N = 4000: relative error ~0.17, cosine ~0.98); the seeds are fixed, so the
    check is deterministic, and 0.8 leaves a wide margin over chance (~1/sqrt(d) = 0.09)."""
    p = _param("layer.weight", (12, 10))
    grad = torch.randn(120, generator=torch.Generator().manual_seed(3))
    directions = make_directions("gaussian", rank=2 if kind == "low-rank" else 0)
    total = torch.zeros(120, dtype=torch.float64)
    n = 4000
    for seed in range(n):
        z = _z(directions, p, seed).double()
        total += float(grad.double() @ z) * z
    cosine = torch.nn.functional.cosine_similarity(total / n, grad.double(), dim=0)
    assert cosine > 0.8, cosine


def test_sparse_z_lives_on_the_smallest_magnitudes_and_perturbs_nothing_else():
    p = _param("layer.weight", (16, 8))
    w = p.param.data.reshape(-1)
    assert w.abs().unique().numel() == w.numel()  # no ties: the share is exact
    sparse = Sparse("rademacher", 0.75)
    out = torch.empty(128)
    sparse.combine(out, w, seed=5, p=p, eps=1e-3)  # the first perturbation sets tau
    tau = sparse.thresholds[p.name]
    small = w.abs() <= tau
    assert int(small.sum()) == math.ceil(0.25 * 128)  # the (1 - sparsity) smallest
    assert torch.equal(out[~small], w[~small])  # bit-identical where unperturbed
    assert (out[small] != w[small]).all()
    z = _z(sparse, p, 5)
    assert torch.equal(z != 0, small) and set(z[small].tolist()) == {-1.0, 1.0}
    # the mask is read from the weights given: raise one element above tau, it freezes
    grown = w.clone()
    i = int(small.nonzero()[0])
    grown[i] = 1.0
    z2 = torch.empty(128)
    sparse.fill(z2, 5, p, 0, grown)
    expected = z.clone()
    expected[i] = 0.0
    assert torch.equal(z2, expected)
    # vectors get the dense noise
    norm = _param("norm.weight", (8,))
    dense = torch.empty(8)
    sparse.combine(dense, norm.param.data, 5, norm, 1e-3)
    assert torch.equal(dense, noise.combine(torch.empty(8), norm.param.data, 5, norm.key,
                                            1e-3, dist="rademacher"))


def test_a_sparse_run_changes_only_the_elements_at_most_tau_and_keeps_tau():
    model = make_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = ZOEngine(model, OptimConfig(lr=5e-3, sparsity=0.75), Objective(
        "label_words", candidates=torch.tensor([5, 9])), seed=1, total_steps=4)
    for i in range(4):
        engine.step(make_batch(seed=i))
    engine.flush()
    taus = engine.state_dict()["directions"]["thresholds"]
    after = engine.export_state_dict()
    matrices = [p for p in engine.params if p.param.dim() >= 2]
    assert matrices and set(taus) == {p.name for p in matrices}
    for p in engine.params:
        old, new = before[p.name], after[p.name]
        changed = old != new
        if p.param.dim() < 2:
            assert changed.all(), p.name  # vectors: dense z
            continue
        # an element above tau at the start is never perturbed nor updated; the rest can
        # be (one that grows past tau freezes from then on)
        assert not changed[old.abs() > taus[p.name]].any(), p.name
        assert changed.any(), p.name
        assert int(changed.sum()) <= math.ceil(0.25 * old.numel()), p.name


def test_settings_that_cannot_work_are_one_clear_error():
    with pytest.raises(ConfigError, match="optim.sparsity"):
        OptimConfig(sparsity=0.5, rank=2).check()
    with pytest.raises(ConfigError, match="optim.history"):
        OptimConfig(method="zo-momentum", history=3, rank=2).check()
    with pytest.raises(ConfigError, match=r"optim.sparsity: is the share"):
        OptimConfig(sparsity=1.0).check()
    with pytest.raises(ConfigError, match="optim.rank"):
        OptimConfig(rank=-1).check()
    wire = OffloadConfig(enabled=True, host_dtype="float32", wire_dtype="bfloat16")
    with pytest.raises(ConfigError, match="offload in the model's dtype"):
        ZOEngine(make_model("opt", dtype=torch.bfloat16), OptimConfig(sparsity=0.5),
                 Objective("label_words", candidates=torch.tensor([5, 9])), offload=wire)
    # low-rank directions are pure functions of the seed: a compressed wire is fine
    ZOEngine(make_model("opt", dtype=torch.bfloat16), OptimConfig(rank=2),
             Objective("label_words", candidates=torch.tensor([5, 9])), offload=wire).close()


@pytest.mark.parametrize("kind", ["sparse", "hizoo-light", "hizoo"])
def test_a_kinds_sum_over_seeds_equals_the_sum_of_its_directions(kind):
    """``accumulate`` does once per chunk what the seeds share (the sparse mask, the
    Hessian scale); ``G`` must keep the bits of summing each seed's ``z`` (the generic
    loop over :meth:`fill`), so the update still agrees with the perturbation."""
    from zo2.directions import Directions
    from zo2.hessian import HessianScaled
    from zo2.perturb import Update

    p = _param("layer.weight", (12, 10))
    weights = p.param.data.reshape(-1)
    if kind == "sparse":
        directions = Sparse("gaussian", 0.75)
        directions.prepare(p, weights)
    else:  # a D that is not 1, advanced by one update of two seeds
        directions = HessianScaled("gaussian", "factored" if kind == "hizoo-light"
                                   else "diagonal", 0.5)
        directions.advance(p, Update((1, 2), (), 1.0, grads=(0.3, -0.2), curv=(4.0, 9.0)))
    seeds, grads = (11, 12, 13), (0.5, -1.25, 2.0)
    for start, n in [(0, 120), (7, 50)]:
        z = torch.empty(n)
        ours, generic = torch.zeros(n), torch.zeros(n)
        part = weights[start: start + n]
        directions.accumulate(ours, z, seeds, grads, p, start, part)
        Directions.accumulate(directions, generic, z, seeds, grads, p, start, part)
        assert torch.equal(ours, generic)
        assert (ours != 0).any()
