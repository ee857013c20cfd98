"""NVLink-aware slicing of offloaded units over the ranks of one node.

With offloading on N GPUs of a node, every rank needs every block on its device, but
the host-to-device links are the bottleneck. With slicing, rank r keeps only slice r
of each block's flat buffer in host memory, uploads only that slice over its own PCIe
link, and the ranks all-gather the slices on the devices (NVLink); after the update
each rank writes back only its own slice. Per block of ``b`` bytes and step, a rank
moves ``b/N`` up and ``b/N`` down over PCIe and receives ``(N-1)b/N`` over NVLink, so::

    t_up(no slicing) = P*b / B_pcie
    t_up(slicing)    = P*b / (N*B_pcie) + (N-1)*P*b / (N*B_nvl)

(and host memory per rank drops from the model to 1/N of it). Without fast links the
all-gather would cross PCIe too and nothing is won: ``slicing=auto`` turns it on only
when every pair of the node's GPUs has peer access. On the CPU the same code runs over
gloo (``slicing=on``), which is how the tests prove it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zo2.parallel.comm import collective

log = logging.getLogger("zo2")


@dataclass
class SliceGroup:
    """The ranks that share the uploads of every offloaded block.

    Args:
        rank: this rank's index in the group (its slice).
        size: number of ranks (slices).
        group: process group for device tensors (NCCL on GPUs, gloo on the CPU).
        host_group: gloo process group for host tensors (export, close).
    """

    rank: int
    size: int
    group: object
    host_group: object
    gathered_bytes: int = 0  # received from the other ranks (NVLink on a GPU node)
    timeout_s: float = 300.0  # a gather waiting longer: a peer died or hangs

    def all_gather(self, full: torch.Tensor) -> None:
        """Fill every slice of ``full`` (a flat device buffer) from its owner."""
        chunk = full.numel() // self.size
        parts = list(full.split(chunk))
        self.gathered_bytes += (self.size - 1) * chunk * full.element_size()
        with collective("all-gather of an offloaded block", self.timeout_s):
            if full.device.type == "cuda":
                dist.all_gather_into_tensor(full, parts[self.rank], group=self.group)
            else:
                dist.all_gather(parts, parts[self.rank].clone(), group=self.group)

    def gather_host(self, mine: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Every rank's host slice, concatenated on global rank ``dst`` (the checkpoint
        writer) only; None on the other ranks, which hold nothing beyond their slice.
        A group without ``dst`` (another node's) skips the collective."""
        if dst not in dist.get_process_group_ranks(self.host_group):
            return None
        parts = [torch.empty_like(mine) for _ in range(self.size)] \
            if dist.get_rank() == dst else None
        with collective("gather of host slices to the writer", self.timeout_s):
            dist.gather(mine.contiguous(), parts, dst=dst, group=self.host_group)
        return None if parts is None else torch.cat(parts)

    def all_gather_host(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's host slice, concatenated (on every rank)."""
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        with collective("all-gather of host slices", self.timeout_s):
            dist.all_gather(parts, mine.contiguous(), group=self.host_group)
        return torch.cat(parts)


def slice_group(mesh, device) -> SliceGroup | None:
    """The node's slice group when slicing applies (``mesh.config.slicing``; offloaded
    runs only), else None. ``device``: this rank's :class:`zo2.offload.Device`, asked
    whether the node's GPUs are peers."""
    mode = mesh.config.slicing
    local = mesh.env.local_world
    if mode == "off" or not mesh.distributed or local < 2:
        return None
    if mode == "auto":
        if not device.peers_connected(local):
            reason = (f"only {torch.cuda.device_count()} GPU(s) visible for {local} ranks"
                      if mesh.device.type == "cuda" and torch.cuda.device_count() < local
                      else "the node's GPUs lack peer access (NVLink / P2P)"
                      if mesh.device.type == "cuda" else "no GPUs")
            if mesh.env.local_rank == 0:  # one line per node
                log.warning("parallel.slicing=auto: off (%s); each of the %d ranks of this "
                            "node keeps and pins the whole offloaded model", reason, local)
            return None
    return SliceGroup(rank=mesh.env.local_rank, size=local, group=mesh.groups.slice,
                      host_group=mesh.groups.slice_host, timeout_s=mesh.config.timeout_s)
