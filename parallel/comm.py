"""What DistZO2 communicates: a few scalars per step, never a weight or gradient tensor.

These are the collectives of the mesh (:class:`~zo2.parallel.mesh.Mesh` inherits
them); on a single-process mesh each is the identity and nothing is communicated.
A training step on a ``dp x pertp`` mesh:

1. *Shard.* Every rank draws the same global batch (same data seed); rank
   ``(dp_rank, pertp_rank)`` keeps rows ``[dp_rank*B/dp, (dp_rank+1)*B/dp)``.
2. *Split the plan.* The step's plan (``+eps, -eps`` per direction) is cut into
   ``pertp`` contiguous parts; rank ``pertp_rank`` runs part ``pertp_rank`` (PertP: with
   ``pertp=2`` and one direction, one rank runs ``+eps`` and the other ``-eps``; with
   ``q`` directions ``2q/pertp`` slices each, i.e. n-SPSA spread over ranks).
3. *One all-reduce.* Each rank contributes, for the slices it ran, the loss and the
   number of labelled positions; one ``all_reduce(SUM)`` of ``2 x slices`` float64
   values over the world gives every rank every slice's loss over the global batch
   (``dp=1``: the value itself, exactly; ``dp>1``: ``sum(mean_r * n_r) / sum(n_r)``).
   For MeZO that is 32 bytes per rank and step, whatever the model size.
4. Every rank computes the same projected gradients and applies the same update, so
   the weights stay bit-identical; :meth:`Collectives.check_in_sync` verifies that
   every ``check_every`` steps with one checksum all-reduce and fails loudly on drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from zo2.errors import DistributedError, ZO2Error


@contextmanager
def collective(what: str, timeout_s: float, setting: str = "parallel.timeout_s"):
    """Turn a failed collective into one clear DistributedError.

    gloo and NCCL raise when a peer's connection closes (it died) or when the operation
    waits longer than the process group's timeout (it hangs); either way this rank
    stops with a message naming the operation, and the launcher ends or restarts the
    job (``torchrun --max-restarts`` resumes it from the last checkpoint).
    """
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError and backend errors
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedError(
            f"rank {rank}: {what} failed: another rank died or hung longer than "
            f"{setting}={timeout_s:g} s ({first})") from err


class Collectives:
    """The scalar collectives of ZO, as methods of the mesh that inherits them.

    The mesh provides ``dp``, ``pertp``, ``world``, ``dp_rank``, ``pertp_rank``,
    ``distributed``, ``config`` (``check_every``), ``host_group`` and ``collective()``.
    """

    bytes_sent = 0  # payload handed to collectives by this rank

    def shard(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """This rank's rows of the global batch (data parallel)."""
        if self.dp == 1:
            return batch
        rows = next(iter(batch.values())).shape[0]
        if rows % self.dp:
            raise ZO2Error(f"a batch of {rows} rows cannot be split over dp={self.dp} ranks "
                           "(optim.batch_size must be a multiple of parallel.dp)")
        size = rows // self.dp
        return {k: v[self.dp_rank * size: (self.dp_rank + 1) * size] for k, v in batch.items()}

    def my_slices(self, n: int) -> range:
        """The perturbation slices of a plan of ``n`` this rank runs (perturbation
        parallel): consecutive, as many on every rank or, where ``pertp`` does not divide
        ``n`` (HiZOO's baseline and pairs: ``2q + 1``), one more on the first ranks."""
        if n < self.pertp:
            raise ZO2Error(f"the step's {n} perturbation slices cannot be split over "
                           f"pertp={self.pertp} ranks: every rank needs one (two-sided: "
                           "2*optim.q slices; raise optim.q or lower parallel.pertp)")
        size, extra = divmod(n, self.pertp)
        first = self.pertp_rank * size + min(self.pertp_rank, extra)
        return range(first, first + size + (self.pertp_rank < extra))

    def combine_losses(self, n: int, mine: Mapping[int, tuple[float, int]]) -> list[float]:
        """Every slice's loss over the global batch from this rank's ``{slice: (mean
        loss, labelled positions)}``: one all-reduce of ``2n`` float64 values."""
        if not self.distributed:
            return [mine[i][0] for i in range(n)]
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
        """``values`` summed over the ranks (evaluation totals)."""
        if not self.distributed:
            return list(values)
        buf = torch.tensor(list(values), dtype=torch.float64)
        self._all_reduce(buf)
        return buf.tolist()

    def eval_share(self, n_batches: int) -> list[int | None]:
        """This rank's evaluation batches, round robin; ``None`` pads to the same count
        on every rank (offloaded slicing needs every rank to run every forward)."""
        rounds = -(-n_batches // self.world)
        return [i if (i := r * self.world + self.rank) < n_batches else None
                for r in range(rounds)]

    @property
    def check_every(self) -> int:
        """Steps between cross-rank checksums (0: never; always 0 on one process)."""
        return self.config.check_every if self.distributed else 0

    def check_in_sync(self, tensors: Sequence[torch.Tensor]) -> None:
        """Raise on every rank when the ranks' weights differ (a cheap checksum)."""
        if not self.distributed:
            return
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

    def _all_reduce(self, buf: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        self.bytes_sent += buf.numel() * buf.element_size()
        with self.collective("all-reduce of the losses"):
            dist.all_reduce(buf, op=op, group=self.host_group)
