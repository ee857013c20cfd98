"""Perturbation plans and the unit wrapper that executes them.

The engine runs one forward per step over a *stacked* batch: the same examples
repeated once per slice of the plan (MeZO: ``[(s, +1), (s, -1)]``, so 2B rows).
Every unit of the model (see :mod:`zo2.units`) is wrapped: when the stacked batch
reaches it, the wrapper splits the unit's inputs along the batch dimension and, for
each slice, points the unit's parameters at ``w0 + sign*eps*z(seed)`` and runs the
module's original forward; the outputs are concatenated again. Each unit is thus
resident once per step whatever the number of slices, and its weights are never
modified by a perturbation: the perturbed values live in a scratch buffer the size
of the largest unit, and the parameters point back at ``w0`` afterwards. Restoring
is exact in every dtype, so any number of steps at ``lr=0`` leave the weights
bit-identical.

Passes over a unit's weights per step (MeZO, q=1), against the naive loop's four
regenerations of ``z`` and four read-modify-writes:

1. the previous step's update ``w0 = w0*decay + sum_j c_j*z_j`` (one regeneration of
   ``z_{t-1}``, fused here into the unit's first use in step t; see ``flush``),
2. ``buf = w0 + eps*z_t`` (one regeneration of ``z_t``),
3. ``buf = 2*w0 - buf`` for the ``-eps`` slice (a mirror: no regeneration).

The ``-eps`` weights are defined as that mirror everywhere (also on a rank that only
runs the minus slice), so every execution path computes bit-identical values.

Splitting rule (:func:`split_batch`, :func:`merge_batch`). A unit sees the model's
own arguments, so the wrapper classifies each tensor by its shape against the stacked
batch of ``total = n * rows`` rows and ``seq_len`` tokens:

* first dimension a multiple of ``total`` (rank >= 2), or exactly ``total`` (1-D):
  stacked; cut into ``n`` equal parts, batch-major (hidden states, masks, per-row
  position ids, attention heads folded into the batch);
* first dimension 1 (rank >= 2), 1-D of length ``seq_len`` or 1, scalars, Python
  values: shared by every slice (rotary tables and ``position_ids`` of batch 1,
  ``cache_position``);
* anything else raises :class:`SplitError` naming the unit and the argument: never a
  silent guess.

A unit whose tensor inputs are all shared (GPT-2's, GPT-Neo's and GPT-BigCode's
learned position embedding of ``position_ids`` of shape ``(1, seq)``) returns one row
per slice; the merge expands each slice's output to that slice's ``rows`` before
concatenating, so the stacked output carries every slice's own values on its own
rows. Limits: the model must consume such an output elementwise against a batched
tensor (broadcasting), as every family in the tests does; a 1-D tensor of length
``seq_len`` is taken as positions even where ``total == seq_len``. The tests check
each family's stacked forward against separate forwards bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from zo2 import noise
from zo2.directions import Directions
from zo2.errors import ModelError
from zo2.units import TrainableParam, Unit

if TYPE_CHECKING:  # zo2.residency imports this module
    from zo2.residency import Residency


def step_seed(run_seed: int, step: int, direction: int) -> int:
    """The 64-bit seed of direction ``direction`` at ``step``: a pure function."""
    digest = hashlib.blake2b(struct.pack("<qqq", run_seed, step, direction), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


@dataclass(frozen=True)
class Slice:
    """One slice of the stacked batch: perturb by ``sign*eps*z(seed)``."""

    seed: int | None
    sign: int  # +1, -1, or 0 (unperturbed; seed is None)


@dataclass(frozen=True)
class Plan:
    """The slices of one step's stacked batch, in order."""

    slices: tuple[Slice, ...]
    eps: float

    @property
    def n(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class Update:
    """A pending ZO update: ``w = w*decay + sum_j coefs[j]*z(seeds[j])``.

    ``round_seed`` keys the random bits of stochastic rounding (:func:`zo2.noise.add_`).
    """

    seeds: tuple[int, ...]
    coefs: tuple[float, ...]
    decay: float  # applied to parameters with ``TrainableParam.decay``
    round_seed: int = 0
    # Rules that are not a pure seed update (:mod:`zo2.rules`): ``g_j / q`` per seed,
    # the learning rate, and how many updates have been made including this one.
    grads: tuple[float, ...] = ()
    lr: float = 0.0
    count: int = 0
    # HiZOO: each seed's curvature |L+ + L- - 2 L0| / (2 eps^2) (zo2.hessian)
    curv: tuple[float, ...] = ()


class PendingUpdate:
    """The last step's update, applied to each parameter exactly once.

    Args:
        dist: distribution of ``z`` (``gaussian`` | ``rademacher``).
        rounding: how the updated value is rounded into a bf16 / fp16 tensor
            (``nearest`` | ``stochastic``; fp32 tensors are always exact-rounded).
        rule: the update rule (:mod:`zo2.rules`) when it is not the fused seed update.
        directions: how ``z`` is formed (:mod:`zo2.directions`; dense by default). The
            perturbation reads it here too, so both regenerate the same ``z``.
    """

    def __init__(self, dist: str = "gaussian", rounding: str = "nearest", rule=None,
                 directions: Directions | None = None) -> None:
        self.dist = dist
        self.rounding = rounding
        self.rule = rule  # a non-fused update rule (zo2.rules); None: the fused kernel
        self.directions = directions or Directions(dist)  # how z is formed (zo2.directions)
        if not self.directions.fused and (rule is None or rule.fused):
            raise ValueError(f"{self.directions.kind} directions need a materialized rule")
        self.update: Update | None = None
        self._applied: set[int] = set()

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps per-parameter state (kept where updates are applied)."""
        return self.rule is not None and self.rule.stateful

    def set(self, update: Update | None) -> None:
        self.update = update
        self._applied = set()

    def needs(self, p: TrainableParam) -> bool:
        return self.update is not None and id(p) not in self._applied

    def apply(self, p: TrainableParam, target: torch.Tensor, start: int = 0) -> None:
        """Apply the update to ``target``, the storage holding ``p``'s current value.

        ``target`` may hold a part of ``p`` only: elements ``[start, start+numel)`` of
        its flattened value (a rank's slice); ``p`` counts as updated afterwards.
        """
        update = self.update
        if update is None or id(p) in self._applied:
            return
        self.directions.advance(p, update)
        if self.rule is not None and not self.rule.fused:
            self.rule.apply(p, target.view(-1), start, update, self.directions)
        else:
            extra = {}
            if self.rounding != "nearest":
                extra = {"rounding": self.rounding, "round_seed": update.round_seed}
            noise.add_(target.view(-1), update.seeds, update.coefs, p.key, start=start,
                       dist=self.dist, decay=update.decay if p.decay else 1.0, **extra)
        if p.floor is not None:  # a quantized layer's scale stays positive (QZO)
            target.clamp_(min=p.floor)
        self._applied.add(id(p))

    def mark(self, p: TrainableParam) -> None:
        """Count ``p`` as updated (its values live elsewhere, e.g. on another rank)."""
        if self.update is not None and id(p) not in self._applied:
            self.directions.advance(p, self.update)  # state every rank keeps whole
            self._applied.add(id(p))


class Scratch:
    """One flat buffer per dtype, reused by whichever unit is running."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buf
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class PerturbationContext:
    """State shared by all wrapped units during a step: plan, residency, scratch."""

    def __init__(self, pending: PendingUpdate, residency: Residency) -> None:
        self.pending = pending
        self.residency = residency
        self.plan: Plan | None = None
        self.shape: BatchShape | None = None
        self.scratch = Scratch()

    # ---- perturbation of one unit ---------------------------------------------------
    def run_unit(self, unit: Unit, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.residency.acquire(unit)
        try:
            if self.plan is None or self.shape is None:
                return original(*args, **kwargs)
            return self._run_slices(unit, original, args, kwargs)
        finally:
            self.residency.release(unit)

    def _run_slices(self, unit: Unit, original: Callable[..., Any], args: tuple,
                    kwargs: dict) -> Any:
        plan, shape = self.plan, self.shape
        arg_parts = split_batch(args, shape, f"unit {unit.name}: positional argument")
        kwarg_parts = split_batch(kwargs, shape, f"unit {unit.name}: keyword argument")
        masters = [p.param.data for p in unit.params]
        views = self._scratch_views(unit)
        outputs = []
        try:
            previous: Slice | None = None
            for index, sl in enumerate(plan.slices):
                self._perturb(unit, masters, views, sl, previous, plan.eps)
                outputs.append(original(*arg_parts[index], **kwarg_parts[index]))
                previous = sl
        finally:
            for p, master in zip(unit.params, masters):
                p.param.data = master
        return merge_batch(outputs, shape.rows)

    def _scratch_views(self, unit: Unit) -> list[torch.Tensor]:
        views, offset = [], 0
        first = unit.params[0].param
        flat = self.scratch.take(unit.numel, first.dtype, first.device)
        for p in unit.params:
            if p.param.dtype != first.dtype:  # mixed-dtype unit: a buffer of its own
                views.append(torch.empty_like(p.param))
                continue
            views.append(flat[offset: offset + p.numel].view_as(p.param))
            offset += p.numel
        return views

    def _perturb(self, unit: Unit, masters: list[torch.Tensor], views: list[torch.Tensor],
                 sl: Slice, previous: Slice | None, eps: float) -> None:
        if sl.seed is None or sl.sign == 0:
            for p, master in zip(unit.params, masters):
                p.param.data = master
            return
        mirror_of_previous = (previous is not None and previous.seed == sl.seed
                              and previous.sign == 1 and sl.sign == -1)
        directions = self.pending.directions
        for p, master, view in zip(unit.params, masters, views):
            if not mirror_of_previous:
                directions.combine(view.view(-1), master.view(-1), sl.seed, p, eps)
            if sl.sign == -1:
                mirror_(view, master)
            p.param.data = view


def mirror_(buf: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """``buf = 2*master - buf`` in place, rounded once: the ``-eps`` weights from ``+eps``."""
    return buf.sub_(master, alpha=2).neg_()


# ---- splitting and merging the stacked batch ---------------------------------------------
@dataclass(frozen=True)
class BatchShape:
    """The stacked batch a step runs: ``n`` slices, ``total`` rows, ``seq_len`` tokens."""

    n: int
    total: int
    seq_len: int

    @property
    def rows(self) -> int:
        """Rows of one slice (the caller's batch)."""
        return self.total // self.n


class SplitError(ModelError):
    """A unit received a tensor that the splitting rule cannot classify."""


def _split_tensor(x: torch.Tensor, shape: BatchShape, where: str) -> list[torch.Tensor] | None:
    """The ``shape.n`` parts of a stacked tensor, or None for a tensor all slices share."""
    if x.dim() == 0:
        return None  # a scalar
    first = x.shape[0]
    if x.dim() == 1:
        if first == shape.seq_len or first == 1:
            return None  # positions of the sequence (cache_position): the same for every row
        if first == shape.total:
            return list(x.chunk(shape.n))  # one value per row
    elif first == 1 and shape.total > 1:
        return None  # broadcasts over the batch (position ids, rotary tables of batch 1)
    elif first % shape.total == 0:
        return list(x.chunk(shape.n))  # rows, or rows x heads folded batch-major
    raise SplitError(
        f"{where} has shape {tuple(x.shape)}: its first dimension is neither the stacked "
        f"batch ({shape.total} rows = {shape.n} slices x {shape.rows}) or a multiple of it, "
        f"nor 1 (broadcast), nor the sequence length {shape.seq_len} (1-D); zo2 cannot tell "
        "how to split it between the perturbation slices"
    )


def split_batch(obj: Any, shape: BatchShape, where: str = "input") -> list[Any]:
    """Split every tensor whose first dim is the stacked batch (or a multiple of it).

    Rank >= 2 tensors whose first dim is a multiple of ``shape.total`` are split into
    ``shape.n`` equal parts (a multiple: models that fold attention heads into the
    batch dim, batch-major); so are 1-D tensors of length ``total``. Tensors of batch 1
    (rank >= 2), 1-D tensors of length ``seq_len`` or 1, scalars and Python values are
    shared by all slices. Any other tensor raises :class:`SplitError` naming ``where``
    (the unit and the argument).
    """
    if isinstance(obj, torch.Tensor):
        parts = _split_tensor(obj, shape, where)
        return parts if parts is not None else [obj] * shape.n
    if isinstance(obj, (tuple, list)):
        columns = [split_batch(item, shape, f"{where}[{i}]") for i, item in enumerate(obj)]
        return [type(obj)(col[i] for col in columns) for i in range(shape.n)]
    if isinstance(obj, dict):
        columns = {k: split_batch(v, shape, f"{where}[{k!r}]") for k, v in obj.items()}
        return [{k: col[i] for k, col in columns.items()} for i in range(shape.n)]
    return [obj] * shape.n


def merge_batch(outputs: list[Any], rows: int = 1) -> Any:
    """Concatenate per-slice outputs along the batch dimension.

    A tensor of batch 1 when a slice has ``rows > 1`` rows came from inputs that all
    broadcast over the batch (a learned position embedding of ``position_ids`` of shape
    ``(1, seq)``): it is expanded to the slice's rows first, so the merged output holds
    each slice's values on that slice's rows. Wherever the model combines it
    elementwise with a batched tensor (``inputs_embeds + position_embeds``) every row
    sees exactly the values a separate forward of the slice broadcasts to it.
    """
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if rows > 1 and first.dim() > 0 and first.shape[0] == 1:
            outputs = [o.expand(rows, *o.shape[1:]) for o in outputs]
        return torch.cat(outputs, dim=0)
    if first is None:
        return None
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
        return type(first)(*(merge_batch(list(col), rows) for col in zip(*outputs)))
    if isinstance(first, (tuple, list)):
        return type(first)(merge_batch(list(col), rows) for col in zip(*outputs))
    if isinstance(first, dict):
        merged = {k: merge_batch([o[k] for o in outputs], rows) for k in first}
        return type(first)(**merged) if type(first) is not dict else merged
    if all(o is first for o in outputs):
        return first
    raise TypeError(f"cannot merge unit outputs of type {type(first).__name__}")


# ---- installing the wrappers ---------------------------------------------------------
class Wrapped:
    """The units of a model with their forwards routed through a context.

    The wrapper is installed per instance (``module.forward``), never on a class, and
    :meth:`remove` restores the modules exactly.
    """

    def __init__(self, units: Sequence[Unit], context: PerturbationContext) -> None:
        self.units = list(units)
        self.context = context
        self._saved: list[tuple[torch.nn.Module, Any]] = []
        for unit in self.units:
            module = unit.module
            had_own = "forward" in module.__dict__
            self._saved.append((module, module.__dict__.get("forward") if had_own else None))
            original = module.forward
            module.forward = functools.update_wrapper(
                functools.partial(_unit_forward, context, unit, original), original
            )

    def remove(self) -> None:
        for module, own in self._saved:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._saved = []


def _unit_forward(context: PerturbationContext, unit: Unit, original: Callable[..., Any],
                  *args: Any, **kwargs: Any) -> Any:
    return context.run_unit(unit, original, args, kwargs)
