"""The offload scheduler: streams blocks through a ring of K device buffers.

The offloader is the hot path (:class:`zo2.residency.Residency`): it owns the ring and
the order blocks go through it (prefetching the order the last pass used), and applies
the pending update on the way. :class:`~zo2.offload.transfers.Transfers` owns what
crosses the bus (the upload and write-back streams, their events, the staging
buffers); :attr:`Offloader.store` (:class:`~zo2.offload.weights.OffloadedWeights`)
the weights' state outside steps. The unit wrapper of :mod:`zo2.perturb` calls
:meth:`Offloader.acquire` before a unit runs and :meth:`Offloader.release` after; the
engine brackets each forward with :meth:`begin_pass` / :meth:`end_pass`.

Timeline of block i in a step (K >= 2, a GPU)::

    upload stream:   ... H2D(i)  H2D(i+1) ...      (waits: slot free, block written)
    compute stream:      wait(ready i) update(i) [cast] forward(i, all slices)
    write-back stream:                                  wait(compute i) D2H(i)

* Upload. ``H2D(i)`` copies the block's flat host buffer into a free ring slot. It
  waits, on the GPU, for the slot's previous occupant to be finished with (its
  compute, or its write-back) and for the block's own last write-back to have
  landed in host memory. Blocks are prefetched in the order the previous pass used
  them, up to K ahead.
* Update. The previous step's pending update is applied to the slot in the host
  dtype (the same kernel and rounding as on resident weights), so each block crosses
  the bus once up and once down per step. When the compute dtype differs, the slot
  is cast into a working buffer of the compute dtype.
* Write-back. After the unit ran, a slot holding an updated block is copied back to
  host memory on the write-back stream, once the compute stream's event says the
  unit is done with it: only the block's trainable prefix (:attr:`Block.trained_end`;
  with LoRA the adapters, never the frozen base weights). Clean blocks (eval,
  ``lr=0``, no trainable parameter) are not written back.

*Compressed wire with an fp32 master* (``wire_dtype`` narrower than ``host_dtype``):
the update is applied to the fp32 host master (CPU kernels, while the GPU computes the
previous block), which goes up cast to the wire dtype through the staging ring;
nothing is written back. Small updates accumulate in fp32. *Disk tier* (blocks
memory-mapped from ``disk_dir``): a GPU's copies to and from a mapping go through the
staging ring both ways (:mod:`~zo2.offload.transfers`).

On the CPU the same code runs with the host as the device: copies are synchronous
and events are wall-clock stamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from zo2 import noise
from zo2.config import OffloadConfig
from zo2.offload.device import Device
from zo2.offload.lazy_weights import SafetensorsWeights, load_into
from zo2.offload.plan import check_same_blocks, check_widened, plan_blocks, plan_dtypes
from zo2.offload.store import Block, PinnedArena, check_host_memory, host_blocks, populate
from zo2.offload.telemetry import gpu_metrics, storage_bytes
from zo2.offload.transfers import Slot, Transfers
from zo2.offload.weights import OffloadedWeights
from zo2.perturb import PendingUpdate
from zo2.residency import Resident
from zo2.units import Unit, unique_params

if TYPE_CHECKING:  # a type only: zo2.parallel.slicing imports zo2.offload
    from zo2.parallel.slicing import SliceGroup


class Offloader:
    """Keeps chosen units in host memory (or on disk) and streams them through the device.

    Args:
        model: the model whose units are offloaded (its other tensors are moved to
            ``device``).
        units: the model's units (:func:`zo2.units.find_units`).
        pending: the pending update shared with the perturbation context.
        config: the offload settings (:class:`~zo2.config.OffloadConfig`): ``ring``
            (K, the device buffers blocks stream through), ``layers_only`` and
            ``resident`` (which units stay on the device), ``host_dtype`` and
            ``wire_dtype`` (a wire narrower than the host copy needs an fp32 host master
            and moves the update to the host), ``disk_dir`` and ``host_budget_gb`` (blocks
            beyond the budget are memory-mapped there), ``timing`` (events per transfer).
        device: the compute device.
        weights: where parameters still on ``meta`` are read from (a model built
            empty, larger than host memory; :mod:`zo2.offload.lazy_weights`).
        slicing: the node's ranks sharing every block's uploads
            (:class:`zo2.parallel.slicing.SliceGroup`): this rank keeps, uploads and
            writes back only its slice, and the slices are all-gathered on the devices.
        local_ranks: processes on this node, each pinning its own blocks: on a GPU the
            node's pinned total is checked against the host memory available first.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], pending: PendingUpdate,
                 config: OffloadConfig, *, device: Device,
                 weights: SafetensorsWeights | None = None,
                 slicing: SliceGroup | None = None, local_ranks: int = 1) -> None:
        config.check()  # the config's own checks (ring, dtypes), again if it was changed
        self.device = device
        self.pending = pending
        self.ring = config.ring
        self.timing = config.timing
        self.slicing = slicing
        self.blocks, self.resident_units = plan_blocks(model, units, config)
        if slicing is not None:  # this rank's slices, once every rank cut the same blocks
            check_same_blocks(self.blocks, slicing)
            for block in self.blocks:
                block.shard(slicing.rank, slicing.size)
        self._block_of = {id(u): b for b in self.blocks for u in b.units}
        # a wire narrower than the host copy, or a stateful rule: the update is applied
        # to the host master (zo2.offload.plan), which is uploaded, never written back
        host, wire, self.master_on_host = plan_dtypes(self.blocks, config, pending.stateful)
        check_widened(self.blocks, host, wire, pending.rounding)
        self._holders: dict[torch.dtype, torch.Tensor] = {}
        self._populate(host, config, weights, local_ranks)
        if weights is not None:
            load_into(model, weights, device.device)  # the resident units
        model.to(device.device)  # resident units, buffers; placeholders are already there
        self._resident = Resident(pending, unique_params(self.resident_units))
        self._slots = self._make_ring(wire)
        self.transfers = Transfers(device, self.blocks, ring=self.ring, wire=wire,
                                   master_on_host=self.master_on_host, timing=self.timing,
                                   slicing=slicing)
        self.stats = self.transfers.stats  # bytes, bandwidth and stalls (telemetry)
        # the weights' state (WeightStore): export, checkpoints, loading, rule state
        self.store = OffloadedWeights(self.blocks, self._resident.params, self,
                                      slicing=slicing)
        self._model = model
        self._order: list[Block] = list(self.blocks)
        self._trace: list[Block] = []
        self._cursor = -1
        self._tick = 0
        self._gathered = 0  # slicing: bytes all-gathered as of the last report

    # ---- construction ---------------------------------------------------------------
    def _populate(self, host: torch.dtype, config: OffloadConfig,
                  weights: SafetensorsWeights | None, local_ranks: int) -> None:
        """Fill the blocks' host copies (in ``host`` dtype): pinned memory on a GPU for
        the blocks kept in host memory, the rest memory-mapped in ``config.disk_dir``."""
        device, slicing = self.device, self.slicing
        self._arena = None
        allocate = lambda numel, dtype: torch.empty(numel, dtype=dtype)  # noqa: E731
        disk_dir, budget = config.disk_dir, config.host_budget_gb * 2**30
        in_host = host_blocks(self.blocks, host, disk_dir, budget)  # the rest: on disk
        pinned = sum(b.host_bytes(host) for b in in_host)  # float lanes and codes lanes
        if device.is_cuda and in_host:  # pinned memory for the blocks kept in host memory
            # the parameters' own CPU storage (not on meta) is given back as blocks fill
            freed = sum(e.param.numel() * e.param.element_size() for b in in_host
                        for e in b.entries + b.codes if e.param.device.type == "cpu")
            check_host_memory(local_ranks, pinned, freed=freed)
            self._arena = PinnedArena(lambda n: device.host_empty(n, torch.uint8),
                                      largest=max(b.host_bytes(host) for b in in_host),
                                      total=pinned)
            allocate = self._arena.take
        suffix = f".slice{slicing.rank}of{slicing.size}" if slicing else ""
        populate(self.blocks, host, disk_dir, budget, allocate=allocate,
                 placeholder=self._placeholder, weights=weights, suffix=suffix)

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """One element on the device; expanded, it stands in for an offloaded parameter."""
        if dtype not in self._holders:
            self._holders[dtype] = torch.zeros(1, dtype=dtype, device=self.device.device)
        return self._holders[dtype]

    def _make_ring(self, wire: torch.dtype | None) -> list[Slot]:
        if not self.blocks:
            return []
        numel = max(b.numel for b in self.blocks)
        compute = self.blocks[0].compute_dtype
        transfer = self.blocks[0].host.dtype if not self.master_on_host else wire
        slots = []
        codes = max(b.codes_numel for b in self.blocks)  # quantized blocks' frozen lane
        for _ in range(min(self.ring, len(self.blocks))):
            store = self.device.empty(numel, transfer)
            work = store if transfer == compute else self.device.empty(numel, compute)
            slots.append(Slot(store, work, codes=self.device.empty(codes, torch.uint8)
                              if codes else None))
        return slots

    # ---- the residency protocol (called by the unit wrapper and the engine) ----------
    def begin_pass(self) -> None:
        """A forward starts: prefetch the first K blocks of the last pass's order."""
        self._trace = []
        self._cursor = -1
        self._prefetch()

    def end_pass(self) -> None:
        if self._trace:
            self._order = self._trace
        self._trace = []
        self._cursor = -1
        self.stats.harvest()

    def acquire(self, unit: Unit) -> None:
        """Point ``unit``'s parameters at device memory holding their current values."""
        block = self._block_of.get(id(unit))
        if block is None:
            self._resident.acquire(unit)
            return
        self._advance(block)
        slot = self._load(block)
        slot.users += 1
        for e in block.entries:  # a widened block's narrower parameters: cast copies
            e.param.data = block.value(slot.work, e)
        for e in block.codes:
            e.param.data = block.code_view(slot.codes, e)
        self._prefetch()

    def release(self, unit: Unit) -> None:
        block = self._block_of.get(id(unit))
        if block is None:
            return
        slot = self._slot_of(block)
        slot.users -= 1
        for e in block.entries + block.codes:
            e.param.data = self._placeholder(e.param.dtype).expand(e.shape)
        if slot.users == 0:
            self._finish(slot)
            self._prefetch()

    def flush(self) -> None:
        """Apply the pending update to every parameter, resident or offloaded."""
        self._resident.flush()
        for block in self.blocks:
            if not self._needs_update(block):
                continue
            if self.master_on_host:
                self._update_on_host(block)
            else:
                self._finish(self._load(block))

    def device_bytes(self) -> int:
        """Bytes of model tensors and ring buffers on the compute device.

        Placeholders (zero-stride) count as nothing; tensors sharing storage once.
        """
        tensors = [t for s in self._slots for t in (s.store, s.work)]
        tensors += list(self._model.parameters()) + list(self._model.buffers())
        return storage_bytes(tensors, self.device.device)

    def report(self) -> dict[str, float]:
        """Transfer figures since the last report, device bytes, and GPU readings."""
        out = self.stats.report()
        out["offload_device_mb"] = self.device_bytes() / 2**20
        if self.slicing is not None:
            gathered = self.slicing.gathered_bytes
            out["offload_gather_mb"] = (gathered - self._gathered) / 2**20
            self._gathered = gathered
        out.update(gpu_metrics(self.device))
        return out

    # ---- the device side of the weights' state (OffloadedWeights, outside steps) ------
    def synchronize(self) -> None:
        """Wait until every write-back has landed in host memory (outside the hot path)."""
        self.transfers.synchronize(self.blocks)

    def drop_copies(self) -> None:
        """Forget the device copies of the slots not in use (host values were changed)."""
        self.transfers.quiesce()
        for slot in self._slots:
            if slot.users == 0:
                self._drop(slot)

    def free_ring(self) -> None:
        """Free the ring (on close, once the parameters hold their values again)."""
        self.transfers.quiesce()  # the ring is freed to the compute stream's allocator next
        self._slots = []

    # ---- scheduling -----------------------------------------------------------------
    def _advance(self, block: Block) -> None:
        """Follow ``block`` in the expected order (for prefetching) and trace it."""
        self._trace.append(block)
        nxt = self._cursor + 1
        if nxt < len(self._order) and self._order[nxt] is block:
            self._cursor = nxt
            return
        later = [i for i in range(nxt, len(self._order)) if self._order[i] is block]
        earlier = [i for i in range(len(self._order)) if self._order[i] is block]
        if later or earlier:
            self._cursor = (later or earlier)[0]

    def _upcoming(self) -> list[Block]:
        window = self._order[self._cursor + 1: self._cursor + 1 + self.ring]
        return list(dict.fromkeys(window))

    def _prefetch(self) -> None:
        upcoming = self._upcoming()
        for block in upcoming:
            loaded = self._slot_of(block)
            if loaded is not None:
                if not self._needs_update(block) or loaded.users:
                    continue
                self._drop(loaded)  # stale: re-upload it with the update
            slot = self._take_slot(block, keep=upcoming)
            if slot is None:
                break
            self._upload(block, slot)
        after = self._order[self._cursor + 1 + self.ring: self._cursor + 2 + self.ring]
        for block in after:
            if block.disk is not None:
                block.disk.prefetch()

    def _load(self, block: Block) -> Slot:
        """The slot holding ``block``, current and updated, ready on the compute stream."""
        slot = self._slot_of(block)
        if slot is not None and self._needs_update(block):
            self._drop(slot)  # uploaded before this update: stale (the update rides uploads)
            slot = None
        if slot is None:
            slot = self._take_slot(block)
            if slot is None:
                raise RuntimeError(f"offload: no free device buffer for {block.name} "
                                   f"(ring={self.ring} is too small for nested units)")
            self._upload(block, slot)
        self.transfers.wait_ready(slot)
        if not slot.work_current:
            slot.work.copy_(slot.store)
            slot.work_current = True
        return slot

    def _finish(self, slot: Slot) -> None:
        """The compute stream is done with ``slot``: write it back if it was updated."""
        self._tick += 1
        slot.tick = self._tick
        slot.free = self.device.record(self.device.compute_stream())
        if slot.dirty:
            self.transfers.write_back(slot.block, slot)

    def _slot_of(self, block: Block) -> Slot | None:
        for slot in self._slots:
            if slot.block is block:
                return slot
        return None

    def _take_slot(self, block: Block, keep: Sequence[Block] = ()) -> Slot | None:
        """The least recently used idle slot whose block is not about to be used."""
        keep_ids = {id(b) for b in keep if b is not block}
        idle = [s for s in self._slots
                if s.users == 0 and (s.block is None or id(s.block) not in keep_ids)]
        if not idle:
            return None
        slot = min(idle, key=lambda s: (s.block is not None, s.tick))
        self._drop(slot)
        return slot

    def _drop(self, slot: Slot) -> None:
        if slot.block is not None and slot.dirty:
            self.transfers.write_back(slot.block, slot)
        slot.block = None
        slot.work_current = False

    def _needs_update(self, block: Block) -> bool:
        return any(self.pending.needs(e.trainable) for e in block.trainable)

    # ---- transfers (the bus itself: zo2.offload.transfers) ------------------------------
    def _upload(self, block: Block, slot: Slot) -> None:
        """Host -> slot, with the pending update: on the host master, or on the way up."""
        if self.master_on_host:
            self._update_on_host(block)
        dirty = not self.master_on_host and self._needs_update(block)
        self.transfers.upload(block, slot, (lambda flat, base: self._apply_update(
            block, flat, base)) if dirty else None)

    def _apply_update(self, block: Block, flat: torch.Tensor, base: int) -> None:
        """Apply the pending update to ``flat``, elements ``[base, base+len)`` of the block.

        Every trainable parameter of the block counts as updated afterwards, also the
        parts other ranks hold: the decision is the same on every rank. A pure seed
        update (the fused rules) runs as one kernel over the block's parameters
        (:func:`zo2.noise.add_segments_`: one launch per block, not per parameter).
        """
        inside = {id(e): (a, b) for e, a, b in block.overlaps(base, base + flat.numel())}
        update, fused = self.pending.update, self.pending.rule is None
        segments, floors = [], []
        for e in block.trainable:
            if not self.pending.needs(e.trainable):
                continue
            if id(e) in inside and fused:
                a, b = inside[id(e)]
                p = e.trainable
                segments.append((a - base, b - a, p.key, a - e.offset, p.decay))
                if p.floor is not None:  # a quantized layer's scales stay positive
                    floors.append((a - base, b - base, p.floor))
                self.pending.mark(p)
            elif id(e) in inside:
                a, b = inside[id(e)]
                self.pending.apply(e.trainable, flat[a - base: b - base], start=a - e.offset)
            else:
                self.pending.mark(e.trainable)
        if segments:
            noise.add_segments_(flat, segments, update.seeds, update.coefs,
                                dist=self.pending.dist, decay=update.decay,
                                rounding=self.pending.rounding, round_seed=update.round_seed)
        for a, b, floor in floors:
            flat[a:b].clamp_(min=floor)
        for e in block.narrowed:  # a widened block: each value rounded to its parameter's
            if e.trainable is not None and id(e) in inside:  # dtype, as resident (nearest)
                a, b = inside[id(e)]
                flat[a - base: b - base] = flat[a - base: b - base].to(e.dtype)

    def _update_on_host(self, block: Block) -> None:
        """Apply the pending update to the fp32 host master (compressed-wire mode)."""
        self.transfers.wait_written(block)
        if not self._needs_update(block):
            return
        self._apply_update(block, block.host, block.lo)
        slot = self._slot_of(block)
        if slot is not None and slot.users == 0:
            self._drop(slot)  # its device copy predates the update

