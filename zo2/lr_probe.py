"""``optim.lr=auto``: the learning rate chosen from the curvature of the loss along ZO
directions, measured on a few training batches before the first step.

The rule. A ZO-SGD step moves the weights along its direction ``z`` only:
``w -> w - a z`` with ``a = lr * g``, ``g`` the projected gradient. Along ``z`` the
loss is, to second order, ``L(w - a z) = L0 - a g + a^2 c / 2`` with ``c = z^T H z`` the
curvature along ``z``; the line minimum is ``a = g / c``, i.e. ``lr = 1 / c``, and any
``lr < 2 / c`` lowers the quadratic model. The probe measures ``c`` the way a step
measures ``g``, from losses only: for each of ``k`` probe batches ``i`` (the first ``k``
batches of the run's own training order, which the run then sees again from the start)
and one probe direction ``z_i`` per batch (seeds no step of the run uses), one stacked
forward gives ``L0`` (unperturbed), ``L+`` and ``L-`` (``w +- eps z_i``, the run's
``optim.eps``), and

    ``c_i = |L+ + L- - 2 L0| / eps^2``    (the central second difference)

The chosen learning rate is

    ``lr = safety * f / median_i(c_i)``

with ``safety`` = :data:`SAFETY` (0.5: half the line minimum, a quarter of the largest
step that still lowers the quadratic model; the median of ``k`` = :data:`PROBE_BATCHES`
(4) batches is robust to one odd batch). ``f`` is the update rule's share of a step:
1 for ``zo-sgd``; ``zo-momentum`` moves the weights along a step's direction by
``lr * g * (1 + beta + beta^2 + ...)`` over the following steps, so ``f = 1 - beta``
(with ``optim.history=k``: ``(1 - beta) / (1 - beta^k)``). ``c`` grows with the number of
trainable parameters (``E[z^T H z] = tr H``) and with the model's curvature, so the lr
adapts to both, as MeZO's theory asks (its step scales as 1 / (d * r)). With ``q`` > 1
directions a step's line minimum grows up to ``q / c`` (the directions' variance terms
average); the rule keeps ``1 / c``, the conservative side.

Not for every rule: ``zo-adam`` and ``zo-sign`` take steps whose length per coordinate is
``lr`` (normalised moments, signs), ``optim.estimator=fzoo`` divides each step by the
spread of its losses, so its ``lr`` is a step length in weight space too, and
``optim.hessian`` scales each step by its own curvature estimate; for them ``lr=auto`` is
refused (:func:`check`) rather than given an lr of the wrong units. (FZOO's
normalisation removes the loss's scale, not the curvature's: its line minimum along
``z_j`` is ``lr = q * sigma / (eps * c)``, ``sigma`` the spread of its perturbed losses, so
a probe would still help it; that variant is not implemented.)

Bit-identity: the probe runs forwards only, with no update pending and none recorded
(:meth:`ZOEngine._losses`), and rewinds the training batches to where they were
(``state_dict`` / ``load_state_dict``), so a run with the probe has the weights and the
data order of the same run given the chosen lr as a number. The result is logged (one
line with the ``c_i``, ``eps`` and the lr), written to ``metrics.jsonl`` (``event:
lr_probe``) and kept in every checkpoint's run state, so a resumed run reuses it and
never probes again.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from zo2.config import OptimConfig
from zo2.errors import ConfigError, TrainingError
from zo2.perturb import Plan, Slice, step_seed

AUTO = "auto"
PROBE_BATCHES = 4  # optim.lr_probe_batches when OptimConfig has it
SAFETY = 0.5  # optim.lr_safety when OptimConfig has it


def is_auto(optim: OptimConfig) -> bool:
    return optim.lr == AUTO


def settings(optim: OptimConfig) -> tuple[int, float]:
    """(probe batches, safety factor): ``optim.lr_probe_batches`` / ``optim.lr_safety``
    where the config has them, else :data:`PROBE_BATCHES` / :data:`SAFETY`."""
    batches = int(getattr(optim, "lr_probe_batches", PROBE_BATCHES))
    safety = float(getattr(optim, "lr_safety", SAFETY))
    if batches < 1:
        raise ConfigError(f"optim.lr_probe_batches: must be >= 1, got {batches}")
    if not 0 < safety <= 2:
        raise ConfigError(f"optim.lr_safety: must be in (0, 2] (2: the largest step that "
                          f"lowers the quadratic model), got {safety}")
    return batches, safety


def check(optim: OptimConfig) -> None:
    """Refuse ``lr=auto`` where the curvature rule does not give the rule's lr."""
    if not is_auto(optim):
        return
    if optim.method in ("zo-adam", "zo-sign"):
        raise ConfigError(f"optim.lr=auto chooses the lr of a gradient step (zo-sgd, "
                          f"zo-momentum) from the loss's curvature; {optim.method} steps "
                          f"lr per coordinate whatever the gradient's scale: set optim.lr")
    if optim.estimator == "fzoo":
        raise ConfigError("optim.lr=auto chooses the lr of a gradient step from the loss's "
                          "curvature; optim.estimator=fzoo divides each step by the spread "
                          "of its losses, so its lr is a step length: set optim.lr")
    if getattr(optim, "hessian", "none") != "none":
        raise ConfigError(f"optim.lr=auto chooses the lr of a plain gradient step from the "
                          f"loss's curvature; optim.hessian={optim.hessian} already scales "
                          f"each step by its own curvature estimate: set optim.lr")
    settings(optim)


def rule_factor(optim: OptimConfig) -> float:
    """``f``: how much of a step's displacement along its direction the rule makes per
    unit of lr, inverted (1 for zo-sgd; momentum adds up ``sum_i beta^i``)."""
    if optim.method != "zo-momentum":
        return 1.0
    beta = optim.momentum
    total = (1 - beta ** optim.history) / (1 - beta) if optim.history else 1 / (1 - beta)
    return 1.0 / total


def probe_seed(run_seed: int, i: int) -> int:
    """The direction of probe batch ``i``: ``step_seed(run_seed, -1 - i, 0)``; a run's
    steps are numbered from 0, so no step (and no stochastic rounding, direction -1)
    ever draws it."""
    return step_seed(run_seed, -1 - i, 0)


@dataclass
class Probe:
    """What the probe measured and chose."""

    lr: float
    eps: float
    safety: float
    factor: float
    curvatures: list[float]  # c_i
    losses: list[list[float]]  # [L0, L+, L-] of each probe batch

    def describe(self) -> str:
        """The one log line."""
        cs = ", ".join(f"{c:.4g}" for c in self.curvatures)
        factor = "" if self.factor == 1 else f" x {self.factor:.4g} (momentum)"
        return (f"optim.lr=auto: curvature along {len(self.curvatures)} probe directions "
                f"c = |L+ + L- - 2 L0| / eps^2 = [{cs}] at eps={self.eps:g}; "
                f"lr = {self.safety:g}{factor} / median(c) = {self.lr:.4g}")

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping) -> Probe:
        return cls(**{k: state[k] for k in ("lr", "eps", "safety", "factor", "curvatures",
                                            "losses")})


def curvature(losses: Sequence[float], eps: float) -> float:
    """``|L+ + L- - 2 L0| / eps^2`` of ``[L0, L+, L-]``."""
    base, plus, minus = losses
    return abs(plus + minus - 2 * base) / (eps * eps)


@torch.no_grad()
def measure(engine, batches: Sequence[Mapping[str, torch.Tensor]], *,
            safety: float = SAFETY) -> Probe:
    """The probe on ``batches`` (one direction each) with ``engine``'s eps, seed and rule;
    the weights are not changed (nothing is pending: call it before the first step)."""
    if engine.step_index or engine.pending.update is not None:
        raise RuntimeError("the lr probe measures the initial weights: run it before the "
                           "first step")
    optim = engine.optim
    eps, measured = optim.eps, []
    for i, batch in enumerate(batches):
        seed = probe_seed(engine.seed, i)
        plan = Plan((Slice(None, 0), Slice(seed, 1), Slice(seed, -1)), eps)
        measured.append(engine._losses(engine._on_device(engine.mesh.shard(batch)), plan))
    curvatures = [curvature(losses, eps) for losses in measured]
    bad = [i for i, c in enumerate(curvatures) if not math.isfinite(c)]
    if bad:
        raise TrainingError(
            f"optim.lr=auto: the probe's losses [L0, L+, L-] on training batch {bad[0]} are "
            f"not finite ({measured[bad[0]]}) at optim.eps={eps:g}: the initial weights or "
            f"this eps give no usable loss; lower optim.eps or set optim.lr")
    median = statistics.median(curvatures)
    if median <= 0:
        raise TrainingError(
            f"optim.lr=auto: the probe measured no curvature on most of its "
            f"{len(curvatures)} training batches (L+ + L- - 2 L0 = 0 at optim.eps={eps:g}, "
            f"c = {curvatures}): the loss is flat at this eps or below float precision; "
            f"raise optim.eps or set optim.lr")
    factor = rule_factor(optim)
    return Probe(lr=safety * factor / median, eps=eps, safety=safety, factor=factor,
                 curvatures=curvatures, losses=[list(map(float, x)) for x in measured])


def peek(data: Iterator, k: int) -> list[dict]:
    """The next ``k`` training batches, and ``data`` rewound to where it was (its
    ``state_dict``), so the run sees the same batches in the same order."""
    state = data.state_dict()
    try:
        return [next(data) for _ in range(k)]
    finally:
        data.load_state_dict(state)


def use(engine, lr: float) -> None:
    """Make ``lr`` the engine's base learning rate (its schedule applies on top)."""
    engine.optim = replace(engine.optim, lr=float(lr))


def choose(engine, data: Iterator) -> Probe:
    """Probe the first batches of ``data`` (rewound after) and set the engine's lr."""
    k, safety = settings(engine.optim)
    result = measure(engine, peek(data, k), safety=safety)
    use(engine, result.lr)
    return result
