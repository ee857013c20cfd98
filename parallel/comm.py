"""What DistZO2 communicates: a few scalars per step, never a weight or gradient tensor.

A training step on a ``dp x pp`` mesh (:class:`~zo2.parallel.mesh.Mesh`):

1. *Shard.* Every rank draws the same global batch (same data seed); rank
   ``(dp_rank, pp_rank)`` keeps rows ``[dp_rank*B/dp, (dp_rank+1)*B/dp)``.
2. *Split the plan.* The step's plan (``+eps, -eps`` per direction) is cut into ``pp``
   contiguous parts; rank ``pp_rank`` runs part ``pp_rank`` (PertP: with ``pp=2`` and one
   direction, one rank runs ``+eps`` and the other ``-eps``; with ``q`` directions
   ``2q/pp`` slices each, i.e. n-SPSA spread over ranks).
3. *One all-reduce.* Each rank contributes, for the slices it ran, the loss and the
   number of labelled positions; one ``all_reduce(SUM)`` of ``2 x slices`` float64
   values over the world gives every rank every slice's loss over the global batch
   (``dp=1``: the value itself, exactly; ``dp>1``: ``sum(mean_r * n_r) / sum(n_r)``).
   For MeZO that is 32 bytes per rank and step, whatever the model size.
4. Every rank computes the same projected gradients and applies the same update, so
   the weights stay bit-identical; :meth:`Comm.check_in_sync` verifies that every
   ``check_every`` steps with one checksum all-reduce and fails loudly on drift.

:class:`LocalComm` is the single-process case with the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from zo2.errors import ZO2Error
from zo2.parallel.slicing import slice_group


class LocalComm:
    """One process: every slice, the whole batch, nothing to communicate."""

    dp = pp = world = 1
    rank = dp_rank = pp_rank = 0
    is_main = True
    bytes_sent = 0
    check_every = 0  # steps between cross-rank checksums (0: never)
    local_ranks = 1  # processes on this node (each pins its own offloaded blocks)

    def shard(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return batch

    def my_slices(self, n: int) -> range:
        return range(n)

    def combine_losses(self, n: int, mine: Mapping[int, tuple[float, int]]) -> list[float]:
        return [mine[i][0] for i in range(n)]

    def sum_across(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def eval_share(self, n_batches: int) -> list[int | None]:
        return list(range(n_batches))

    def check_in_sync(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def slicing(self):
        """The slice group for offloaded units (:mod:`zo2.parallel.slicing`), or None."""
        return None

    def barrier(self) -> None:
        pass

    def wait_for_writer(self) -> None:
        """Wait until rank 0 has written a checkpoint (``parallel.save_timeout_s``)."""


class Comm(LocalComm):
    """The scalar collectives of ZO on a :class:`~zo2.parallel.mesh.Mesh`."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh
        self.dp, self.pp, self.world = mesh.dp, mesh.pp, mesh.world
        self.rank, self.dp_rank, self.pp_rank = mesh.rank, mesh.dp_rank, mesh.pp_rank
        self.is_main = mesh.is_main
        self.check_every = mesh.config.check_every
        self.local_ranks = mesh.env.local_world
        self.bytes_sent = 0  # payload handed to collectives by this rank

    def shard(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(batch.values())).shape[0]
        if rows % self.dp:
            raise ZO2Error(f"a batch of {rows} rows cannot be split over dp={self.dp} ranks "
                           "(optim.batch_size must be a multiple of parallel.dp)")
        size = rows // self.dp
        return {k: v[self.dp_rank * size: (self.dp_rank + 1) * size] for k, v in batch.items()}

    def my_slices(self, n: int) -> range:
        if n % self.pp:
            raise ZO2Error(f"the step's {n} perturbation slices cannot be split over pp={self.pp} "
                           f"ranks (two-sided: 2*optim.q must be a multiple of parallel.pp)")
        size = n // self.pp
        return range(self.pp_rank * size, (self.pp_rank + 1) * size)

    def combine_losses(self, n: int, mine: Mapping[int, tuple[float, int]]) -> list[float]:
        buf = torch.zeros(2 * n, dtype=torch.float64)
        for i, (loss, count) in mine.items():
            buf[2 * i] = loss if self.dp == 1 else loss * count
            buf[2 * i + 1] = count
        self._all_reduce(buf)
        values = buf.tolist()
        if self.dp == 1:  # one rank ran each slice: its loss, exactly
            return values[0::2]
        return [values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else math.nan
                for i in range(n)]

    def sum_across(self, values: Sequence[float]) -> list[float]:
        buf = torch.tensor(list(values), dtype=torch.float64)
        self._all_reduce(buf)
        return buf.tolist()

    def eval_share(self, n_batches: int) -> list[int | None]:
        """This rank's evaluation batches, round robin; ``None`` pads to the same count
        on every rank (offloaded slicing needs every rank to run every forward)."""
        rounds = -(-n_batches // self.world)
        return [i if (i := r * self.world + self.rank) < n_batches else None
                for r in range(rounds)]

    def check_in_sync(self, tensors: Sequence[torch.Tensor]) -> None:
        """Raise on every rank when the ranks' weights differ (a cheap checksum)."""
        total = 0.0
        for t in tensors:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            total += float(flat[::step].double().sum())
        buf = torch.tensor([total, -total], dtype=torch.float64)
        self._all_reduce(buf, dist.ReduceOp.MAX)
        high, low = buf[0].item(), -buf[1].item()
        if high != low:
            raise ZO2Error(f"ranks diverged: weight checksums range over [{low!r}, {high!r}]; "
                           "the ranks must run identical code, data and seeds")

    def barrier(self) -> None:
        self.mesh.barrier()

    def wait_for_writer(self) -> None:
        self.mesh.wait_for_writer()

    def slicing(self):
        return slice_group(self.mesh)

    def _all_reduce(self, buf: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        self.bytes_sent += buf.numel() * buf.element_size()
        with self.mesh.collective("all-reduce of the losses"):
            dist.all_reduce(buf, op=op, group=self.mesh.host_group)
