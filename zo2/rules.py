"""ZO update rules: how each step's projected gradients become a weight update.

A step estimates projected gradients ``g_j`` along directions ``z_j`` (``j < q``), so
the gradient estimate is ``G = (1/q) * sum_j g_j z_j``, with ``z_j`` regenerated from
its seed whenever it is needed (:mod:`zo2.noise`). A rule turns the estimates into the
update the engine applies lazily, parameter by parameter, while the unit is resident
(:class:`zo2.perturb.PendingUpdate`):

==================  ==========================================  =====================
rule                update                                      per-parameter state
==================  ==========================================  =====================
``zo-sgd``          ``w -= lr*G``                               none
``zo-momentum``     ``m = beta*m + G; w -= lr*m``               one buffer; or none
                                                                with ``history=k``
``zo-adam``         ``m, v`` (Adam moments of ``G``);           two buffers
                    ``w -= lr * m_hat / (sqrt(v_hat) + eps)``
``zo-sign``         ``w -= lr * sign(G)`` (ZO-signSGD)          none
==================  ==========================================  =====================

State costs what it says: one (momentum) or two (Adam) model-sized buffers in
``optim.state_dtype`` (float32: 4 bytes a parameter each; bfloat16 halves it). Two
memory-light variants:

* ``zo-momentum`` with ``optim.history=k``: the momentum rebuilt from the last ``k``
  steps' seeds, ``w -= lr * sum_{i<k} beta^i G_{t-i}``: exact momentum truncated
  after ``k`` steps (the dropped tail weighs ``beta^k``), no state at all, at the
  cost of ``k`` regenerations of ``z`` per step instead of one. Being a pure seed
  update it runs on the fused update kernel, so it works wherever ZO-SGD does.
* ``optim.state_dtype=bfloat16`` for the moments of ``zo-momentum`` / ``zo-adam``.

Rules with state keep it where the update is applied: on the device for resident
weights, next to the host master when offloading (the offloader then applies updates
on the host and uploads, see :mod:`zo2.offload.scheduler`). With offload slicing a
rank keeps the state of its slice of each block only; the offloader gathers it whole
for checkpoints and cuts a checkpoint's state to the slice on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from zo2.choices import METHODS, RULE_SETTINGS
from zo2.config import OptimConfig
from zo2.directions import Directions, make_directions
from zo2.errors import ConfigError
from zo2.perturb import Update
from zo2.units import TrainableParam

# each rule and the OptimConfig fields it reads besides lr (e.g. for a seed log's header)


class Rule:
    """ZO-SGD; the base of the other rules.

    ``fused``: the update is a pure seed update ``w = w*decay + sum c_j z_j`` applied by
    the fused kernel (:func:`zo2.noise.add_`); otherwise :meth:`apply` runs per
    parameter. ``stateful``: the rule keeps per-parameter tensors (:meth:`state`).
    """

    name = "zo-sgd"
    fused = True
    stateful = False

    def update(self, history: Sequence[Mapping], lr: float, decay: float,
               round_seed: int) -> Update:
        """The update after the newest record of ``history`` (the engine's seed log:
        ``seeds`` and ``grads`` = ``g_j / q`` of each applied step)."""
        last = history[-1]  # its coefs are -lr * g_j / q
        return Update(tuple(last["seeds"]), tuple(last["coefs"]), decay, round_seed=round_seed)

    def apply(self, p: TrainableParam, target: torch.Tensor, start: int, update: Update,
              directions: Directions) -> None:
        raise NotImplementedError  # fused rules never get here

    def state(self) -> dict[str, torch.Tensor]:
        """Per-parameter state tensors by name (checkpoints); empty for stateless rules."""
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        pass

    def drop_state(self, p: TrainableParam) -> None:
        """Forget ``p``'s state (a replay done with ``p``); nothing for stateless rules."""


class HistoryMomentum(Rule):
    """Momentum rebuilt from the last ``k`` steps' seeds: no state, ``k`` regenerations."""

    name = "zo-momentum"

    def __init__(self, beta: float, k: int) -> None:
        self.beta, self.k = beta, k

    def update(self, history, lr, decay, round_seed) -> Update:
        seeds, coefs = [], []
        for age, record in enumerate(reversed(history[-self.k:])):
            weight = -lr * self.beta ** age
            seeds += record["seeds"]
            coefs += [weight * g for g in record["grads"]]
        return Update(tuple(seeds), tuple(coefs), decay, round_seed=round_seed)


CHUNK = 1 << 21  # elements a materialized rule updates at a time (8 MiB of float32)


class _Materialized(Rule):
    """A rule that needs ``G`` as a tensor: it is built in a float32 scratch buffer.

    The update is elementwise, so it runs over ``CHUNK`` elements at a time: the
    scratch and the float32 temporaries stay a few MiB however large the parameter
    (an embedding is tens of millions of elements), with the same bits as one pass.
    """

    fused = False
    buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._scratch: dict[object, torch.Tensor] = {}  # one per stream (see scratch)

    def update(self, history, lr, decay, round_seed) -> Update:
        last = history[-1]
        return Update(tuple(last["seeds"]), (), decay, round_seed=round_seed,
                      grads=tuple(last["grads"]), lr=lr, count=len(history),
                      curv=tuple(last.get("curv", ())))

    def estimate(self, p: TrainableParam, target: torch.Tensor, start: int, update: Update,
                 directions: Directions) -> torch.Tensor:
        """``G`` for elements ``[start, start+n)`` of ``p``, float32 (scratch-owned);
        ``target`` holds their current values (``n`` of them)."""
        n = target.numel()
        buf = self.scratch(2 * n, target.device)
        total, z = buf[:n], buf[n: 2 * n]
        total.zero_()
        directions.accumulate(total, z, update.seeds, update.grads, p, start, target)
        return total

    def scratch(self, n: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least ``n`` elements on ``device``, one per stream.

        With offloading, blocks are updated on the upload stream while resident units
        are updated on the compute stream: one shared buffer would be written by both
        with no event between them, and a grown one freed to one stream's allocator
        while the other still reads it. A buffer of each stream, allocated while that
        stream is current, is only ever used and freed in that stream's order.
        """
        key = stream_of(device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(n, dtype=torch.float32, device=device)
        return buf

    def apply(self, p: TrainableParam, target: torch.Tensor, start: int, update: Update,
              directions: Directions) -> None:
        states = [self.buffer(p, which, target, start) for which in self.buffers]
        n = target.numel()
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            g = self.estimate(p, target[a:b], start + a, update, directions)
            self.chunk(p, target[a:b], g, [s[a:b] for s in states], update)

    def chunk(self, p: TrainableParam, target: torch.Tensor, g: torch.Tensor,
              states: list[torch.Tensor], update: Update) -> None:
        """Update ``target`` (and the matching ``states``) given its part ``g`` of ``G``."""
        raise NotImplementedError

    @staticmethod
    def step(p: TrainableParam, target: torch.Tensor, direction: torch.Tensor,
             update: Update) -> None:
        """``target = target*decay - lr*direction`` (computed in float32, rounded once)."""
        w = target.float()
        if p.decay and update.decay != 1.0:
            w.mul_(update.decay)
        w.add_(direction, alpha=-update.lr)
        target.copy_(w)


def stream_of(device: torch.device) -> object:
    """The stream work on ``device`` is queued on now (the device itself on the CPU)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else device


class Plain(_Materialized):
    """ZO-SGD with ``G`` materialized: for directions the fused kernel cannot generate
    (sparse, low-rank: :mod:`zo2.directions`)."""

    name = "zo-sgd"

    def chunk(self, p, target, g, states, update) -> None:
        self.step(p, target, g, update)


class Sign(_Materialized):
    name = "zo-sign"

    def chunk(self, p, target, g, states, update) -> None:
        self.step(p, target, g.sign_(), update)


class _Stateful(_Materialized):
    """A rule with per-parameter buffers (``buffers``), kept for the elements it updates.

    Each buffer holds the state of the part of its parameter this process updates:
    all of it, or a rank's slice with offload slicing (:mod:`zo2.parallel.slicing`),
    so slicing shards the state as it shards the host masters. State loaded whole from
    a checkpoint is cut down to that part on first use.
    """

    stateful = True

    def __init__(self, state_dtype: torch.dtype) -> None:
        super().__init__()
        self.state_dtype = state_dtype
        self._state: dict[str, torch.Tensor] = {}  # key -> elements [start, start+len)
        self._start: dict[str, int] = {}

    def buffer(self, p: TrainableParam, which: str, target: torch.Tensor,
               start: int) -> torch.Tensor:
        """The state of elements ``[start, start + target.numel())`` of ``p``."""
        key, n = self.key(p.name, which), target.numel()
        have = self._state.get(key)
        if have is None:
            have = torch.zeros(n, dtype=self.state_dtype, device=target.device)
        else:
            lo = self._start[key]
            if start < lo or start + n > lo + have.numel():
                raise RuntimeError(f"{key}: state kept for elements [{lo}, "
                                   f"{lo + have.numel()}), asked for [{start}, {start + n})")
            if (lo, have.numel()) != (start, n):  # keep just the part this process updates
                have = have[start - lo: start - lo + n].clone()
            have = have.to(target.device)
        self._state[key], self._start[key] = have, start
        return have

    @staticmethod
    def key(name: str, which: str) -> str:
        """The state key of buffer ``which`` of the parameter called ``name``."""
        return f"{name}.{which}"

    def portion(self, key: str, a: int, b: int) -> torch.Tensor | None:
        """Elements ``[a, b)`` of state ``key`` (``"<param>.<buffer>"``); None if not kept."""
        have = self._state.get(key)
        if have is None:
            return None
        lo = self._start[key]
        return have[a - lo: b - lo]

    def shard(self, lo: int, hi: int) -> StateShard:
        """The state seen from slice ``[lo, hi)`` of a flat parameter space."""
        return StateShard(self, lo, hi)

    def state(self) -> dict[str, torch.Tensor]:
        """The state kept by this process (whole tensors unless offload slicing is on)."""
        return dict(self._state)

    def load_state(self, tensors: Mapping[str, torch.Tensor],
                   starts: Mapping[str, int] | None = None) -> None:
        """Take state tensors; ``starts[key]``: the element a part-tensor begins at."""
        self._state = {k: v.reshape(-1).to(self.state_dtype) for k, v in tensors.items()}
        self._start = {k: (starts or {}).get(k, 0) for k in self._state}

    def drop_state(self, p: TrainableParam) -> None:
        for which in self.buffers:
            self._state.pop(self.key(p.name, which), None)
            self._start.pop(self.key(p.name, which), None)


class StateShard:
    """A stateful rule's state seen from slice ``[lo, hi)`` of a flat parameter space.

    The space holds parameters back to back, each at its offset: an offloaded block,
    and with offload slicing a rank's slice of one (:mod:`zo2.offload.sliced_state`).
    The view answers what the holder of the slice needs, with the rule's storage kept
    behind it: which buffers there are (:attr:`buffers`, in :attr:`dtype`), the key a
    parameter's buffer is saved under (:meth:`key`), and for the part of a parameter
    inside the slice (:meth:`span`) the state kept (:meth:`portion`) or the same part
    cut from a whole state tensor (:meth:`cut`).
    """

    def __init__(self, rule: _Stateful, lo: int, hi: int) -> None:
        self._rule, self.lo, self.hi = rule, lo, hi

    @property
    def buffers(self) -> tuple[str, ...]:
        return self._rule.buffers

    @property
    def dtype(self) -> torch.dtype:
        return self._rule.state_dtype

    def key(self, name: str, which: str) -> str:
        """The state key (in checkpoints) of buffer ``which`` of parameter ``name``."""
        return self._rule.key(name, which)

    def span(self, offset: int, numel: int) -> tuple[int, int]:
        """Elements ``[a, b)`` of a parameter at ``offset`` (``numel`` long) that lie in
        the slice, counted from the parameter's start; none when ``a >= b``."""
        return max(self.lo - offset, 0), min(self.hi - offset, numel)

    def portion(self, name: str, which: str, offset: int, numel: int) -> torch.Tensor | None:
        """The kept state ``which`` of parameter ``name``'s part in the slice (:meth:`span`);
        None if the rule keeps none for it or no part of it lies in the slice."""
        a, b = self.span(offset, numel)
        return self._rule.portion(self.key(name, which), a, b) if a < b else None

    def cut(self, whole: torch.Tensor, offset: int, numel: int
            ) -> tuple[torch.Tensor, int] | None:
        """A parameter's part in the slice, cut from its ``whole`` state tensor (a
        checkpoint's), with the element it starts at; None if no part lies in the slice."""
        a, b = self.span(offset, numel)
        return (whole.reshape(-1)[a:b].clone(), a) if a < b else None


class Momentum(_Stateful):
    name = "zo-momentum"
    buffers = ("momentum",)

    def __init__(self, beta: float, state_dtype: torch.dtype) -> None:
        super().__init__(state_dtype)
        self.beta = beta

    def chunk(self, p, target, g, states, update) -> None:
        (m,) = states
        moment = m.float().mul_(self.beta).add_(g)
        m.copy_(moment)
        self.step(p, target, moment, update)


class Adam(_Stateful):
    name = "zo-adam"
    buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, beta1: float, beta2: float, eps: float,
                 state_dtype: torch.dtype) -> None:
        super().__init__(state_dtype)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def chunk(self, p, target, g, states, update) -> None:
        m, v = states
        # float32 buffers are updated in place (.float() is the buffer itself); others
        # through a float32 copy, rounded once on the way back
        m32 = m.float().mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v32 = v.float().mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        m.copy_(m32)
        v.copy_(v32)
        t = update.count
        denom = v32.div(1 - self.beta2 ** t).sqrt_().add_(self.eps)  # new tensors: the
        direction = m32.div(1 - self.beta1 ** t).div_(denom)  # moments stay as they are
        self.step(p, target, direction, update)


def make_rule(optim: OptimConfig) -> Rule:
    """The rule ``optim.method`` names, with its settings. With sparse or low-rank
    directions (:mod:`zo2.directions`) it forms ``G`` as a tensor: the fused kernel
    generates dense directions only."""
    state_dtype = getattr(torch, optim.state_dtype)
    fused = not (optim.sparsity or optim.rank or optim.hessian != "none")
    if optim.method == "zo-sgd":
        return Rule() if fused else Plain()
    if optim.method == "zo-momentum":
        if optim.history > 0:
            if not fused:
                raise ConfigError("optim.history rebuilds the momentum from older steps' "
                                  "seeds with the fused kernel, which forms dense directions "
                                  "only: set optim.history=0 with optim.sparsity or optim.rank")
            return HistoryMomentum(optim.momentum, optim.history)
        return Momentum(optim.momentum, state_dtype)
    if optim.method == "zo-adam":
        return Adam(optim.beta1, optim.beta2, optim.adam_eps, state_dtype)
    if optim.method == "zo-sign":
        return Sign()
    raise ConfigError(f"optim.method: {optim.method!r} is not one of {list(METHODS)}")


def settings(optim: OptimConfig) -> dict:
    """``optim.method`` and the fields its rule reads, and the shape of the directions
    where it is not dense (:data:`DIRECTION_SETTINGS`): enough to rebuild the rule and
    the directions (:func:`directions_of`)."""
    if optim.method not in RULE_SETTINGS:
        raise ConfigError(f"optim.method: {optim.method!r} is not one of {list(METHODS)}")
    shape = {k: getattr(optim, k) for k in ("sparsity", "rank") if getattr(optim, k)}
    if optim.hessian != "none":
        shape.update(estimator=optim.estimator, hessian=optim.hessian,
                     hessian_smooth=optim.hessian_smooth)
    if optim.scale_floor != OptimConfig.scale_floor:  # quantized scales' clamp (zo2.quantized)
        shape["scale_floor"] = optim.scale_floor
    return {"method": optim.method, **{k: getattr(optim, k) for k in RULE_SETTINGS[optim.method]},
            **shape}


def directions_of(optim: OptimConfig) -> Directions:
    """The directions ``optim`` selects (:mod:`zo2.directions`)."""
    return make_directions(optim.direction, optim.sparsity, optim.rank, optim.hessian,
                           optim.hessian_smooth)


def state_bytes(rule: Rule, numel: int) -> int:
    """Bytes of per-parameter state the rule keeps for ``numel`` trainable elements."""
    if not rule.stateful:
        return 0
    size = torch.empty((), dtype=rule.state_dtype).element_size()
    return len(rule.buffers) * numel * size
