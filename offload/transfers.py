"""What crosses the bus: the upload and write-back streams, their events, the staging ring.

:class:`Transfers` moves one block at a time between its host copy and a ring slot
(:class:`Slot`) on the device; the scheduler (:mod:`zo2.offload.scheduler`) decides
which block goes into which slot and when. Uploads run on their own stream after the
slot's previous use and the block's last write-back (GPU event waits, no host block);
the previous step's update rides on the upload, applied to this rank's slice on the
upload stream, and with slicing the slices are all-gathered there too. Write-backs run
on a second stream once the compute stream is done with the slot.

Staging (a ring of K pinned host buffers) sits between a host copy and the bus where
that copy cannot be read or written asynchronously: the compressed wire (the fp32
master is cast into the buffer) and the disk tier (a memory map is pageable memory, so
``non_blocking`` would be synchronous). A staged write-back lands in its mapping once
its event fired, before the block is next read on the host or uploaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from zo2.offload.device import Device
from zo2.offload.store import Block
from zo2.offload.telemetry import TransferStats

if TYPE_CHECKING:  # a type only: zo2.parallel.slicing imports zo2.offload
    from zo2.parallel.slicing import SliceGroup

STAGE_ON_CPU = False  # tests: run the disk tier's staging path on the CPU too


@dataclass(eq=False)
class Slot:
    """One device buffer of the ring and the block it holds."""

    store: torch.Tensor  # flat device buffer in the transfer dtype
    work: torch.Tensor  # flat device buffer in the compute dtype (may be ``store``)
    block: Block | None = None
    ready: object = None  # upload finished
    free: object = None  # the last use of ``store`` finished (compute or write-back)
    users: int = 0
    dirty: bool = False  # updated on the device, not yet written back
    work_current: bool = False  # ``work`` holds ``store``'s values
    tick: int = 0
    codes: torch.Tensor | None = None  # flat uint8: a quantized block's frozen codes


@dataclass(eq=False)
class Staging:
    buf: torch.Tensor  # pinned host buffer in the wire dtype (disk tier: the host dtype)
    copied: object = None  # the copy reading or filling it finished
    landing: Block | None = None  # disk tier: a write-back of this block waits in ``buf``
    count: int = 0  # elements of that write-back


class Transfers:
    """The streams, events and staging buffers of one offloader.

    Args:
        device: the compute device.
        blocks: the offloaded blocks (staging is sized from them).
        ring: K, the number of staging buffers (as many as ring slots).
        wire: the dtype on the bus.
        master_on_host: the update is applied to the host copy (compressed wire or a
            stateful rule): uploads only, never a write-back of an update.
        timing: time every transfer with events (:class:`TransferStats`).
        slicing: the node's ranks sharing every block's uploads, or None.
    """

    def __init__(self, device: Device, blocks: Sequence[Block], *, ring: int,
                 wire: torch.dtype | None, master_on_host: bool, timing: bool,
                 slicing: SliceGroup | None) -> None:
        self.device = device
        self.master_on_host = master_on_host
        self.timing = timing
        self.slicing = slicing
        self.stats = TransferStats()
        self.staging = self._make_staging(blocks, ring, wire)
        self.upload_stream = device.new_stream()
        self.down_stream = device.new_stream()
        self.written: dict[int, object] = {}  # id(block) -> its last write-back event
        self._stage_index = 0

    def _make_staging(self, blocks: Sequence[Block], ring: int,
                      wire: torch.dtype | None) -> list[Staging]:
        """Pinned buffers between host copies and the bus: for the compressed wire (the
        cast), and for blocks on disk (a mapping is pageable memory)."""
        on_disk = [b for b in blocks if b.disk is not None]
        if not (self.device.is_cuda or STAGE_ON_CPU and not self.master_on_host) \
                or not (self.master_on_host or on_disk):
            return []
        staged = blocks if self.master_on_host else on_disk
        dtype = wire if self.master_on_host else staged[0].host.dtype
        numel = max(b.hi - b.lo for b in staged)
        return [Staging(self.device.host_empty(numel, dtype)) for _ in range(ring)]

    # ---- staging ----------------------------------------------------------------------
    def _stage(self) -> Staging:
        """The next staging buffer, free: its last copy done, its write-back landed."""
        stage = self.staging[self._stage_index % len(self.staging)]
        self._stage_index += 1
        self._land(stage)
        return stage

    def _land(self, stage: Staging) -> None:
        """Wait for the buffer's last copy; a write-back in it goes on into its mapping."""
        if stage.copied is not None:
            stage.copied.synchronize()  # a host wait: the host touches the buffer next
            stage.copied = None
        if stage.landing is not None:
            stage.landing.host[: stage.count].copy_(stage.buf[: stage.count])
            stage.landing = None

    def land_block(self, block: Block) -> None:
        """Before the host reads ``block`` (or uploads it): its staged write-back lands."""
        for stage in self.staging:
            if stage.landing is block:
                self._land(stage)

    # ---- moving a block -------------------------------------------------------------------
    def upload(self, block: Block, slot: Slot,
               update: Callable[[torch.Tensor, int], None] | None = None) -> None:
        """Host -> slot: this rank's slice, with ``update(flat, base)`` (the pending
        update of elements ``[base, base+len)``) applied on the way, then the others'."""
        lo, hi = block.lo, block.hi
        source = block.host
        stage = None
        if self.staging and (self.master_on_host or block.disk is not None):
            self.land_block(block)  # its last write-back, still in a staging buffer
            stage = self._stage()
            stage.buf[: hi - lo].copy_(block.host)  # the wire cast / out of the mapping
            source = stage.buf[: hi - lo]
        stream = self.upload_stream
        self.device.wait(stream, slot.free)
        self.device.wait(stream, self.written.get(id(block)))
        with self.device.on(stream):
            start = self.device.record(stream, self.timing)
            slot.store[lo:hi].copy_(source, non_blocking=True)
            codes = block.codes_numel
            if codes:  # the frozen codes lane, whole on every rank, never written back
                slot.codes[:codes].copy_(block.codes_host, non_blocking=True)
            uploaded = self.device.record(stream, self.timing)
            if update is not None:  # the previous step's update, fused into the upload
                update(slot.store[lo:hi], lo)
            if self.slicing is not None:
                self.slicing.all_gather(slot.store[: block.numel])
            slot.ready = self.device.record(stream, self.timing)
        if stage is not None:
            stage.copied = slot.ready
        if self.timing:
            self.stats.add("up", (hi - lo) * slot.store.element_size() + block.codes_numel,
                           start, uploaded)
        slot.block, slot.dirty = block, update is not None
        slot.work_current = slot.work is slot.store

    def wait_ready(self, slot: Slot) -> None:
        """The compute stream waits for the slot's upload (timed as a stall)."""
        compute = self.device.compute_stream()
        if not self.timing:
            self.device.wait(compute, slot.ready)
            return
        before = self.device.record(compute, True)
        self.device.wait(compute, slot.ready)
        self.stats.add("wait", 0, before, self.device.record(compute, True))

    def write_back(self, block: Block, slot: Slot) -> None:
        """Slot -> host: the trainable prefix of this rank's slice (frozen parts never)."""
        slot.dirty = False
        lo, hi = block.lo, min(block.hi, block.trained_end)
        if hi <= lo:
            return  # this rank's slice holds frozen parameters only
        stream = self.down_stream
        self.device.wait(stream, slot.ready)  # its upload (and the update riding it)
        self.device.wait(stream, slot.free)  # and its last use
        stage = None
        if self.staging and block.disk is not None:  # into pinned memory, then the map
            self.land_block(block)
            stage = self._stage()
        target = block.host if stage is None else stage.buf
        with self.device.on(stream):
            start = self.device.record(stream, self.timing)
            target[: hi - lo].copy_(slot.store[lo:hi], non_blocking=True)
            done = self.device.record(stream, self.timing)
        if stage is not None:
            stage.copied, stage.landing, stage.count = done, block, hi - lo
        slot.free = done
        self.written[id(block)] = done
        if self.timing:
            self.stats.add("down", (hi - lo) * slot.store.element_size(), start, done)

    # ---- waiting --------------------------------------------------------------------------
    def wait_written(self, block: Block) -> None:
        """A host wait for ``block``'s last write-back, landed in its host copy."""
        event = self.written.pop(id(block), None)
        if event is not None:
            event.synchronize()
        self.land_block(block)

    def synchronize(self, blocks: Sequence[Block]) -> None:
        """Wait until every write-back has landed in host memory (outside the hot path)."""
        for event in self.written.values():
            event.synchronize()
        self.written.clear()
        for stage in self.staging:
            if stage.landing is not None:
                self._land(stage)
        for block in blocks:
            if block.disk is not None:
                block.disk.sync()

    def quiesce(self) -> None:
        """Order the compute stream after all uploads and write-backs queued so far
        (event waits, no host block): ring buffers dropped or freed after this are
        reused only once the side streams are done with them."""
        compute = self.device.compute_stream()
        for stream in (self.upload_stream, self.down_stream):
            self.device.wait(compute, self.device.record(stream) if stream is not None
                             else None)
