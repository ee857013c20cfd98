"""The offloaded weights' state: the :class:`~zo2.residency.WeightStore` over the blocks.

The scheduler (:mod:`zo2.offload.scheduler`) is the hot path, the ring blocks stream
through; :class:`OffloadedWeights` is everything called outside steps: the current
values read from the blocks' host copies (export, checkpoints, cross-rank checks),
weights loaded into them, and a stateful update rule's state (with slicing gathered
from and cut to the ranks' slices, :mod:`zo2.offload.sliced_state`). It touches the
device side only through :class:`DeviceCopies`: the ring's write-backs and copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from zo2.offload.sliced_state import gather_rule_state, slice_rule_state
from zo2.offload.store import Block
from zo2.units import TrainableParam

if TYPE_CHECKING:  # a type only: zo2.parallel.slicing imports zo2.offload
    from zo2.parallel.slicing import SliceGroup


class DeviceCopies(Protocol):
    """The device side of the blocks, as the state needs it (the offloader)."""

    def synchronize(self) -> None:
        """Wait until every write-back has landed in the blocks' host copies."""

    def drop_copies(self) -> None:
        """Forget the device copies not in use (the host copies were changed)."""

    def free_ring(self) -> None:
        """Give the ring's device buffers back (the parameters hold their values)."""


class OffloadedWeights:
    """The state of weights kept in offloaded blocks (and of the units left resident).

    Args:
        blocks: the offloaded blocks (:mod:`zo2.offload.store`).
        resident: the trainable parameters of the units that stay on the device.
        copies: the device side (:class:`DeviceCopies`).
        slicing: the node's ranks sharing the blocks, each holding its slice
            ``[block.lo, block.hi)``; None: this rank holds whole blocks.
    """

    def __init__(self, blocks: Sequence[Block], resident: Sequence[TrainableParam],
                 copies: DeviceCopies, slicing: SliceGroup | None = None) -> None:
        self.blocks = list(blocks)
        self.resident = list(resident)
        self.copies = copies
        self.slicing = slicing
        self._entry_of = {id(e.param): (b, e) for b in self.blocks for e in b.entries}
        self._code_of = {id(e.param): (b, e) for b in self.blocks for e in b.codes}

    def host_tensors(self, writer_only: bool = False) -> dict[int, torch.Tensor]:
        """id(param) -> a host tensor holding its current value (after a flush).

        With slicing the slices are all-gathered first (a collective: every rank of
        the node calls it), so every rank briefly holds whole blocks; ``writer_only``
        (saving): block by block to the checkpoint writer (rank 0) only, and the other
        ranks get nothing for the offloaded parameters.
        """
        self.copies.synchronize()
        out = {}
        for b in self.blocks:
            flat = self._whole(b) if not writer_only or self.slicing is None \
                else self.slicing.gather_host(b.host)
            if flat is None:
                continue
            if b.codes:  # a quantized block: its own tensors (transformers' save of a
                # quantized model refuses tensors sharing a buffer); a 4-bit block is small
                out.update({id(e.param): b.value(flat, e).clone() for e in b.entries})
                out.update({id(e.param): b.code_view(b.codes_host, e).clone()
                            for e in b.codes})
            else:
                out.update({id(e.param): b.value(flat, e) for e in b.entries})
        return out

    def assign(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set ``param``'s current value (loading weights): this rank's slice of it."""
        entry = self._entry_of.get(id(param))
        if entry is None and id(param) in self._code_of:  # frozen codes: the codes lane
            block, e = self._code_of[id(param)]
            block.code_view(block.codes_host, e).copy_(value)
            self.copies.drop_copies()  # a device copy holds the old codes
            return
        if entry is None:
            param.data.copy_(value)
            return
        self.copies.synchronize()  # no write-back may land on top of it
        block, e = entry
        a, b = max(block.lo, e.offset), min(block.hi, e.offset + e.numel)
        if a < b:
            block.host[a - block.lo: b - block.lo].copy_(
                value.reshape(-1)[a - e.offset: b - e.offset])

    def rule_state(self, rule, writer_only: bool = False) -> dict[str, torch.Tensor]:
        """A stateful update rule's whole state (:mod:`zo2.rules`), for checkpoints; with
        slicing gathered from the ranks' slices (:mod:`zo2.offload.sliced_state`)."""
        if self.slicing is None:
            return rule.state()
        return gather_rule_state(self.blocks, self.slicing, rule, writer_only)

    def load_rule_state(self, rule, tensors: dict[str, torch.Tensor]) -> None:
        """Give a stateful rule its whole state (a checkpoint's); with slicing this rank
        keeps the part of each offloaded parameter its slice holds."""
        if self.slicing is None:
            rule.load_state(tensors)
            return
        rule.load_state(*slice_rule_state(self.blocks, rule, tensors))

    def replicated_tensors(self) -> list[torch.Tensor]:
        """Tensors every rank holds identically (for cross-rank checksums)."""
        self.copies.synchronize()
        hosts = [] if self.slicing else [b.host for b in self.blocks]
        return [p.param.data for p in self.resident] + hosts

    def invalidate(self) -> None:
        """Forget device copies (host values were changed from outside)."""
        self.copies.synchronize()
        self.copies.drop_copies()

    def materialize(self) -> None:
        """Give every offloaded parameter its own CPU tensor again (on close)."""
        self.copies.synchronize()
        for block in self.blocks:
            whole = self._whole(block)
            for e in block.entries:
                e.param.data = block.view(whole, e).to(e.dtype, copy=True)
            for e in block.codes:
                e.param.data = block.code_view(block.codes_host, e).clone()
        self.copies.free_ring()

    def _whole(self, block: Block) -> torch.Tensor:
        """The block's whole flat host buffer (gathered from the slices with slicing)."""
        if self.slicing is None:
            return block.host
        return self.slicing.all_gather_host(block.host)
