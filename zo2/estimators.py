"""Gradient estimators: which perturbed losses a step measures, and the projected
gradients they give.

An estimator is an object with ``plan(seeds, eps)`` (the slices of the step's stacked
batch, :class:`~zo2.perturb.Plan`) and ``grads(losses, eps)`` (one projected gradient
per seed from the slices' losses, in plan order); one that carries information from
step to step keeps it itself (``observe`` after an applied step, ``state_dict`` /
``load_state_dict`` for checkpoints). The engine never asks which estimator it runs:
a new estimator is a new class here, in :data:`ESTIMATORS`, and its name in
:data:`zo2.choices.ESTIMATORS`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from zo2.perturb import Plan, Slice


class Estimator(ABC):
    """The interface, and the stateless default for ``observe`` and the state."""

    name = ""

    @abstractmethod
    def plan(self, seeds: Sequence[int], eps: float) -> Plan:
        """The slices of the step's stacked batch for these seeds."""

    @abstractmethod
    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        """One projected gradient per seed from the slices' losses (plan order)."""

    def curvatures(self, losses: Sequence[float], eps: float) -> list[float]:
        """Per seed, what the directions' state needs of the step besides the gradient
        (HiZOO's curvature, :mod:`zo2.hessian`); empty for the other estimators."""
        return []

    def observe(self, losses: Sequence[float]) -> None:  # noqa: B027 (stateless: nothing)
        """The losses of a step whose update was applied (finite)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (stateless: nothing)
        """Restore what :meth:`state_dict` returned."""


class TwoSided(Estimator):
    """MeZO / n-SPSA: ``+eps`` and ``-eps`` per seed; ``g = (L+ - L-) / (2 eps)``."""

    name = "two-sided"

    def plan(self, seeds: Sequence[int], eps: float) -> Plan:
        return Plan(tuple(Slice(s, sign) for s in seeds for sign in (1, -1)), eps)

    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        return [(losses[i] - losses[i + 1]) / (2 * eps) for i in range(0, len(losses), 2)]


class OneSided(Estimator):
    """An unperturbed baseline, then ``+eps`` per seed; ``g = (L+ - L0) / eps``."""

    name = "one-sided"

    def plan(self, seeds: Sequence[int], eps: float) -> Plan:
        return Plan((Slice(None, 0),) + tuple(Slice(s, 1) for s in seeds), eps)

    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        return [(loss - losses[0]) / eps for loss in losses[1:]]


class OnePoint(Estimator):
    """Residual feedback: ``+eps`` only; ``g = (L+_t - L+_{t-1}) / eps``, the baseline
    being the previous applied step's perturbed loss (0 on the first step)."""

    name = "one-point"

    def __init__(self) -> None:
        self.prev_loss: float | None = None

    def plan(self, seeds: Sequence[int], eps: float) -> Plan:
        return Plan(tuple(Slice(s, 1) for s in seeds), eps)

    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        return [0.0 if self.prev_loss is None else (losses[0] - self.prev_loss) / eps]

    def observe(self, losses: Sequence[float]) -> None:
        self.prev_loss = losses[0]

    def state_dict(self) -> dict:
        return {"prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.prev_loss = state.get("prev_loss")


class FZOO(OneSided):
    """FZOO (ICLR 2026): one unperturbed baseline and ``q`` one-sided perturbations in a
    batch (Rademacher directions in the paper: ``optim.direction=rademacher``), each step
    normalised by the spread of the perturbed losses:
    ``g_j = (L_j - L_0) / std(L_1..L_q)`` (population std). The update
    ``-lr/q * sum_j g_j z_j`` then has a length set by ``lr`` whatever the loss's scale
    (no ``eps`` in it: the differences and their spread scale alike). Equal perturbed
    losses (a spread of 0) carry no direction: every ``g_j`` is 0. Needs ``q >= 2``."""

    name = "fzoo"

    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        perturbed = losses[1:]
        mean = sum(perturbed) / len(perturbed)
        spread = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / len(perturbed))
        if spread == 0.0 or not math.isfinite(spread):
            return [0.0 if math.isfinite(spread) else math.nan for _ in perturbed]
        return [(loss - losses[0]) / spread for loss in perturbed]


class HiZOO(Estimator):
    """HiZOO (ICLR 2025): an unperturbed baseline, then ``+eps`` and ``-eps`` per seed
    along the Hessian-scaled directions (:mod:`zo2.hessian`); ``g = (L+ - L-) / (2 eps)``
    and the curvature ``kappa = |L+ + L- - 2 L0| / (2 eps^2)`` that advances ``D``.
    One forward more than MeZO per step (``2q + 1`` slices)."""

    name = "hizoo"

    def plan(self, seeds: Sequence[int], eps: float) -> Plan:
        pairs = tuple(Slice(s, sign) for s in seeds for sign in (1, -1))
        return Plan((Slice(None, 0),) + pairs, eps)

    def grads(self, losses: Sequence[float], eps: float) -> list[float]:
        return [(losses[i] - losses[i + 1]) / (2 * eps) for i in range(1, len(losses), 2)]

    def curvatures(self, losses: Sequence[float], eps: float) -> list[float]:
        return [abs(losses[i] + losses[i + 1] - 2 * losses[0]) / (2 * eps * eps)
                for i in range(1, len(losses), 2)]


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (TwoSided, OneSided, OnePoint, FZOO, HiZOO)}


def make_estimator(name: str) -> Estimator:
    """The estimator called ``name`` (``optim.estimator``)."""
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}") from None
