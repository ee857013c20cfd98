"""HiZOO's Hessian-scaled directions: ``z = n / sqrt(D)``, ``D`` a running diagonal
curvature estimate kept per parameter (Zhao et al., ICLR 2025; ``optim.estimator=hizoo``).

A step measures ``L0`` (unperturbed) and ``L+-`` at ``w0 +- eps*z``; with
``kappa = |L+ + L- - 2 L0| / (2 eps^2)`` (the curvature along ``z``, halved), the update
of the step first advances the estimate, element by element,

    ``D <- D * (1 - alpha + alpha * kappa * n^2)``    (``alpha``: ``optim.hessian_smooth``)

which is the paper's ``Sigma^-1 <- (1 - alpha) Sigma^-1 + alpha kappa
diag(Sigma^-1/2 n n^T Sigma^-1/2)`` with ``D = Sigma^-1``, and then applies the rule
to ``g = (L+ - L-) / (2 eps)`` along ``n / sqrt(D)`` with the advanced ``D`` (q
directions: ``kappa n^2`` averaged over them). ``D`` starts at 1 (MeZO's directions).
Where curvature is high the steps shrink.

``D`` is a function of the seeds and the ``kappa`` of every step, so the seed log
records ``kappa`` and a replay rebuilds ``D`` exactly; checkpoints save ``D``.

Two variants (``optim.hessian``):

* ``diagonal``: ``D`` as one float32 tensor per parameter, on the compute device: 4
  bytes a trainable parameter. The perturbation reads it on the device, so offloaded
  blocks (whose perturbation runs on the device while their master lives on the host)
  take the light variant.
* ``factored`` (HiZOO-L, memory-light): a matrix keeps only its row sums ``R`` and
  column sums ``C`` of ``D``, and ``D_ij = R_i C_j / sum(R)`` (Adafactor's rank-1
  reconstruction, exact while ``D`` is 1); after each advance ``R`` and ``C`` are the
  sums of the advanced full ``D``. ``rows + cols`` floats per matrix, so it stays on the
  device beside any offloaded model; vectors keep their diagonal. The advance forms the
  whole matrix (every rank alike: a slice's update needs the sums over all of it).

Values: every operation on an element is an IEEE operation (multiply, add, divide,
sqrt), so a slice of ``z`` equals the same elements of the whole; the factored sums
are torch reductions, the same bits on one kind of device (a replay on another kind
may differ in the last bits of ``D``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zo2 import noise
from zo2.directions import CHUNK, _Structured
from zo2.units import TrainableParam


class HessianScaled(_Structured):
    """``z = n / sqrt(D)``; ``D`` advanced by each applied update (:meth:`advance`)."""

    kind = "hessian"

    def __init__(self, dist: str, variant: str, smooth: float) -> None:
        super().__init__(dist)
        self.variant, self.smooth = variant, smooth
        self.diag: dict[str, torch.Tensor] = {}  # name -> D (flat float32)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (R, C)

    def settings(self) -> dict:
        return {"kind": self.kind, "hessian": self.variant, "hessian_smooth": self.smooth}

    @staticmethod
    def structured(p: TrainableParam) -> bool:
        return True  # every parameter is scaled (vectors by their diagonal)

    def _factored(self, p: TrainableParam) -> bool:
        return self.variant == "factored" and p.param.dim() >= 2

    def _shape(self, p: TrainableParam) -> tuple[int, int]:
        rows = p.param.shape[0]
        return rows, p.numel // rows

    # ---- D ----------------------------------------------------------------------------
    def curvature(self, p: TrainableParam, start: int, n: int,
                  device: torch.device) -> torch.Tensor:
        """``D`` of elements ``[start, start+n)`` of ``p`` (float32, a new tensor)."""
        if self._factored(p):
            factors = self.factors.get(p.name)
            if factors is None:
                return torch.ones(n, dtype=torch.float32, device=device)
            r, c = (t.to(device) for t in factors)
            cols = c.numel()
            first, last = start // cols, (start + n - 1) // cols
            block = r[first: last + 1, None] * c[None, :]  # one rounding per element
            block.div_(r.sum())  # rows floats: reduced again by every call (once a chunk)
            offset = start - first * cols
            return block.view(-1)[offset: offset + n].clone()
        d = self.diag.get(p.name)
        if d is None:
            return torch.ones(n, dtype=torch.float32, device=device)
        return d[start: start + n].to(device, copy=True)

    def fill(self, z, seed, p, start, weights) -> None:
        noise.fill(z, seed, p.key, start, self.dist)
        if z.numel():
            z.div_(self.curvature(p, start, z.numel(), z.device).sqrt_())

    def accumulate(self, total, z, seeds, grads, p, start, weights) -> None:
        if not z.numel():
            return
        scale = self.curvature(p, start, z.numel(), z.device).sqrt_()  # once per chunk
        for seed, g in zip(seeds, grads):
            noise.fill(z, seed, p.key, start, self.dist)
            total.add_(z.div_(scale), alpha=g)

    def advance(self, p: TrainableParam, update) -> None:
        """``D <- D * (1 - alpha + alpha * mean_j kappa_j n_j^2)`` over all of ``p``.

        The pending update calls it once per parameter and update, on every rank, also
        for a parameter whose elements this rank does not update (offload slicing):
        each rank keeps all of ``D``, which the perturbation reads."""
        if not update.curv:
            return
        device = self._device(p)
        rows, cols = self._shape(p)
        factored = self._factored(p)
        new_r = torch.zeros(rows, dtype=torch.float32, device=device) if factored else None
        new_c = torch.zeros(cols, dtype=torch.float32, device=device) if factored else None
        new_d = None if factored else torch.empty(p.numel, dtype=torch.float32, device=device)
        step = max(1, CHUNK // cols) * cols if factored else CHUNK  # whole rows when factored
        n = torch.empty(min(step, p.numel), dtype=torch.float32, device=device)
        q = len(update.curv)
        for a in range(0, p.numel, step):
            b = min(p.numel, a + step)
            factor = torch.zeros(b - a, dtype=torch.float32, device=device)
            for seed, kappa in zip(update.seeds, update.curv):
                part = noise.fill(n[: b - a], seed, p.key, a, self.dist)
                factor.add_(part.mul_(part).mul_(kappa / q))  # mean_j kappa_j n_j^2
            factor.mul_(self.smooth).add_(1.0 - self.smooth)
            d = self.curvature(p, a, b - a, device).mul_(factor)
            if factored:
                d = d.view(-1, cols)
                new_r[a // cols: b // cols] = d.sum(1)
                new_c.add_(d.sum(0))
            else:
                new_d[a:b] = d
        if factored:
            self.factors[p.name] = (new_r, new_c)
        else:
            self.diag[p.name] = new_d

    def _device(self, p: TrainableParam) -> torch.device:
        have = self.diag.get(p.name) if not self._factored(p) else \
            (self.factors.get(p.name) or (None,))[0]
        if have is not None:
            return have.device
        device = p.param.device
        return torch.device("cpu") if device.type == "meta" else device

    # ---- checkpoints ------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """``D`` by name for a checkpoint: ``<param>.hessian`` (diagonal) or
        ``<param>.hessian_rows`` / ``.hessian_cols`` (factored)."""
        out = {f"{k}.hessian": v for k, v in self.diag.items()}
        for k, (r, c) in self.factors.items():
            out[f"{k}.hessian_rows"], out[f"{k}.hessian_cols"] = r, c
        return out

    def load_tensors(self, tensors: Mapping[str, torch.Tensor],
                     device: torch.device) -> None:
        self.diag, self.factors = {}, {}
        for key, t in tensors.items():
            t = t.to(device=device, dtype=torch.float32).reshape(-1)
            if key.endswith(".hessian"):
                self.diag[key.removesuffix(".hessian")] = t
            elif key.endswith(".hessian_rows"):
                name = key.removesuffix(".hessian_rows")
                self.factors[name] = (t, tensors[f"{name}.hessian_cols"].to(
                    device=device, dtype=torch.float32).reshape(-1))
