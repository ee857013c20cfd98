"""Where the units' weights live: the two interfaces the engine talks to.

* :class:`Residency`, the hot path: the unit wrapper and the engine call it on every
  unit of every forward (``acquire`` / ``release`` around a unit, ``begin_pass`` /
  ``end_pass`` around a forward, ``flush`` to apply the pending update everywhere).
* :class:`WeightStore`, the state: the current values for export, checkpoints and
  cross-rank checks, weight loading, the update rule's state; called outside steps.

:class:`Resident` and :class:`InPlaceWeights` are the two for weights that stay on the
compute device; for streamed ones the offloader (:class:`zo2.offload.Offloader`) is the
residency and its ``store`` (:class:`zo2.offload.OffloadedWeights`) the weight store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from zo2.perturb import PendingUpdate
from zo2.units import TrainableParam, Unit


class Residency(Protocol):
    """``acquire(unit)`` makes the unit's parameters hold their current values on the
    compute device, with the pending update applied; ``release(unit)`` ends that use."""

    def begin_pass(self) -> None: ...
    def end_pass(self) -> None: ...
    def acquire(self, unit: Unit) -> None: ...
    def release(self, unit: Unit) -> None: ...
    def flush(self) -> None: ...
    def report(self) -> dict: ...


class WeightStore(Protocol):
    """The weights' current values and the update rule's state, outside the hot path.

    ``writer_only`` (saving with offload slicing): gather whole values to the checkpoint
    writer only; elsewhere it changes nothing.
    """

    def replicated_tensors(self) -> list[torch.Tensor]: ...
    def host_tensors(self, writer_only: bool = False) -> dict[int, torch.Tensor]: ...
    def rule_state(self, rule, writer_only: bool = False) -> dict[str, torch.Tensor]: ...
    def load_rule_state(self, rule, tensors: dict[str, torch.Tensor]) -> None: ...
    def assign(self, param: torch.nn.Parameter, value: torch.Tensor) -> None: ...
    def invalidate(self) -> None: ...
    def materialize(self) -> None: ...


class Resident:
    """Every unit stays on the compute device; the update is applied in place when a
    unit is first used in a step (or by ``flush``)."""

    def __init__(self, pending: PendingUpdate, params: Sequence[TrainableParam]) -> None:
        self.pending = pending
        self.params = list(params)

    def begin_pass(self) -> None:
        pass

    def end_pass(self) -> None:
        pass

    def acquire(self, unit: Unit) -> None:
        for p in unit.params:
            self.pending.apply(p, p.param.data)

    def release(self, unit: Unit) -> None:
        pass

    def flush(self) -> None:
        for p in self.params:
            self.pending.apply(p, p.param.data)

    def report(self) -> dict:
        return {}


class InPlaceWeights:
    """The state of weights that live in their own parameters (resident)."""

    def __init__(self, params: Sequence[TrainableParam]) -> None:
        self.params = list(params)

    def replicated_tensors(self) -> list[torch.Tensor]:
        return [p.param.data for p in self.params]

    def host_tensors(self, writer_only: bool = False) -> dict[int, torch.Tensor]:
        return {}  # the parameters hold their values

    def rule_state(self, rule, writer_only: bool = False) -> dict[str, torch.Tensor]:
        return rule.state()

    def load_rule_state(self, rule, tensors: dict[str, torch.Tensor]) -> None:
        rule.load_state(tensors)

    def assign(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value)

    def invalidate(self) -> None:
        pass  # no copies elsewhere

    def materialize(self) -> None:
        pass  # the parameters are their own tensors already
