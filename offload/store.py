"""Block store: each offloaded unit's parameters in one flat host buffer.

A *block* is the host-side home of one unit (a decoder layer, or any other unit
chosen for offloading): every parameter the unit's module owns, trainable or
frozen, laid out back to back (offsets aligned to 64 elements) in one flat buffer of
the host dtype, trainable parameters first: they form one prefix of the buffer, the
only part an update changes and the only part written back (parameter-efficient
fine-tuning, e.g. LoRA, writes back its adapters and never the frozen base weights).
Units that share a parameter (an LM head tied to the input embedding) share one
block. The flat buffer is page-locked host memory when there is a GPU, or a
memory-mapped safetensors file on disk (:mod:`zo2.offload.disk`) for blocks beyond
the host-memory budget.

A unit whose float parameters differ in dtype (a 4-bit layer's float32 scales beside
bfloat16 norms) is held *widened*: its flat buffer is float32, which holds every 16-bit
value exactly. Such a parameter keeps its own dtype on the device (a cast copy of its
slice, made when the unit is acquired), and an update to it is rounded to its dtype in
the buffer right after it is applied: the same value a resident parameter gets, whose
update is computed in float32 and rounded to nearest once.

A quantized layer's integer codes (:mod:`zo2.quantized`) are not part of that buffer:
they form a second, frozen lane of the block, one flat byte buffer (:attr:`Block.codes`)
uploaded with the block and never written back, while the layer's float scales are
ordinary (trainable) entries of the flat buffer. A 4-bit block so crosses the bus in
about a quarter of the bytes of its 16-bit weights (a byte per two codes, plus a float
scale per 64 of them).

Between uses an offloaded parameter holds a *placeholder*: a one-element tensor
expanded to the parameter's shape, on the compute device and in its dtype, so
``model.dtype``, ``model.device`` and shape checks still see the right values while
the weights use no device memory. The scheduler points the parameters at views of
a device buffer while the unit runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from zo2.errors import ConfigError
from zo2.offload.disk import DiskBuffer, map_flat, write_flat
from zo2.offload.lazy_weights import assign
from zo2.units import TrainableParam, Unit

ALIGN = 64  # elements: every parameter starts on a 256-byte (fp32) boundary


@dataclass(eq=False)
class Entry:
    """One parameter inside a block's flat buffer."""

    name: str
    param: nn.Parameter
    offset: int
    shape: torch.Size
    trainable: TrainableParam | None  # None: frozen, carried but never updated
    dtype: torch.dtype  # the parameter's own (in a widened block: narrower than the lane)

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(eq=False)
class Block:
    """The host home of one or more units that share parameters."""

    name: str
    units: list[Unit]
    entries: list[Entry] = field(default_factory=list)
    numel: int = 0
    compute_dtype: torch.dtype = torch.float32
    host: torch.Tensor | None = None  # flat, host dtype: pinned memory or a disk mapping
    disk: DiskBuffer | None = None
    lo: int = 0  # this rank's slice [lo, hi) of the flat buffer (all of it without slicing)
    hi: int = 0
    codes: list[Entry] = field(default_factory=list)  # frozen 1-byte integer tensors
    codes_numel: int = 0  # bytes of the codes lane
    codes_host: torch.Tensor | None = None  # flat uint8, in host memory

    def add(self, name: str, param: nn.Parameter, trainable: TrainableParam | None) -> None:
        if not param.is_floating_point():  # a quantized layer's codes: the frozen lane
            if param.element_size() != 1 or trainable is not None:
                raise ConfigError(f"offload: {name} ({param.dtype}) is neither a float "
                                  "parameter nor a frozen 1-byte code tensor")
            self.codes.append(Entry(name, param, self.codes_numel, param.shape, None,
                                    param.dtype))
            self.codes_numel += _aligned(param.numel())
            return
        self.entries.append(Entry(name, param, self.numel, param.shape, trainable,
                                  param.dtype))
        self.numel += _aligned(param.numel())
        self.hi = self.numel

    def host_bytes(self, host_dtype: torch.dtype | None) -> int:
        """Bytes this block keeps in host memory: its slice of the flat buffer in
        ``host_dtype`` (its compute dtype when None) and its whole codes lane."""
        size = torch.empty((), dtype=host_dtype or self.compute_dtype).element_size()
        return (self.hi - self.lo) * size + self.codes_numel

    @staticmethod
    def code_view(flat: torch.Tensor, entry: Entry) -> torch.Tensor:
        """``entry``'s codes in a flat byte buffer laid out like this block's codes lane."""
        return flat[entry.offset: entry.offset + entry.numel].view(entry.param.dtype) \
            .view(entry.shape)

    def view(self, flat: torch.Tensor, entry: Entry) -> torch.Tensor:
        """``entry``'s slice of a flat buffer laid out like this block."""
        return flat[entry.offset: entry.offset + entry.numel].view(entry.shape)

    def value(self, flat: torch.Tensor, entry: Entry) -> torch.Tensor:
        """``entry``'s slice of ``flat``: a view, or for a parameter this (widened) block
        holds wider than its own dtype, a copy cast to that dtype. (A wider host master,
        ``offload.host_dtype=float32``, stays a view: its precision is the point.)"""
        view = self.view(flat, entry)
        return view.to(entry.dtype) if entry.dtype != self.compute_dtype else view

    @property
    def narrowed(self) -> list[Entry]:
        """The entries whose parameter is narrower than the flat buffer (widened)."""
        return [e for e in self.entries if e.dtype != self.compute_dtype]

    @property
    def trainable(self) -> list[Entry]:
        return [e for e in self.entries if e.trainable is not None]

    @property
    def trained_end(self) -> int:
        """Flat elements ``[0, trained_end)`` hold every trainable parameter.

        Trainable entries come first (:func:`group_units`), so an update changes this
        prefix only; the whole (padded) buffer when every entry is trainable, 0 when none.
        """
        trained = self.trainable
        if len(trained) == len(self.entries):
            return self.numel
        return max((e.offset + _aligned(e.numel) for e in trained), default=0)

    def shard(self, rank: int, size: int) -> None:
        """Keep slice ``rank`` of ``size`` equal slices (the flat buffer is padded)."""
        self.numel = -(-self.numel // (size * ALIGN)) * size * ALIGN
        chunk = self.numel // size
        self.lo, self.hi = rank * chunk, (rank + 1) * chunk

    def overlaps(self, lo: int, hi: int) -> list[tuple[Entry, int, int]]:
        """(entry, a, b): the flat range [a, b) of each entry inside [lo, hi)."""
        out = []
        for e in self.entries:
            a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
            if a < b:
                out.append((e, a, b))
        return out


def group_units(model: nn.Module, units: Sequence[Unit], offload: Sequence[bool]
                ) -> tuple[list[Block], list[Unit]]:
    """Split units into offloaded blocks and resident units.

    Units sharing a parameter fall into one block. A group stays resident when any of
    its units is not chosen for offloading, or when one of its parameters is also
    used by a module outside every unit (it must stay where that module can see it).
    """
    owner: dict[int, int] = {}  # id(module) -> index of the unit whose subtree holds it
    for index, unit in enumerate(units):
        for module in unit.module.modules():
            owner.setdefault(id(module), index)
    users: dict[int, set[int | None]] = {}  # id(param) -> unit indices (None: outside)
    named: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is None:
                continue
            users.setdefault(id(param), set()).add(owner.get(id(module)))
            named.setdefault(id(param), (f"{module_name}.{local}".lstrip("."), param))

    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pinned_resident = [not flag for flag in offload]
    for ids in users.values():
        members = [i for i in ids if i is not None]
        for i in members[1:]:
            parent[find(i)] = find(members[0])
        if None in ids:
            for i in members:
                pinned_resident[i] = True
    resident_root = {find(i) for i, flag in enumerate(pinned_resident) if flag}

    blocks: dict[int, Block] = {}
    resident: list[Unit] = []
    for index, unit in enumerate(units):
        root = find(index)
        if root in resident_root:
            resident.append(unit)
            continue
        block = blocks.setdefault(root, Block(unit.name, []))
        block.units.append(unit)
    trainable = {id(p.param): p for unit in units for p in unit.params}
    for p in trainable.values():  # tensors trained that no module owns: quantized scales
        named.setdefault(id(p.param), (p.name, p.param))
    for block in blocks.values():
        params = {id(p): p for unit in block.units for p in unit.module.parameters()}
        params.update({id(p.param): p.param for unit in block.units for p in unit.params})
        ordered = sorted(params.values(), key=lambda p: id(p) not in trainable)  # stable
        for param in ordered:
            block.add(named[id(param)][0], param, trainable.get(id(param)))
        block.compute_dtype = _block_dtype(block)
    return list(blocks.values()), resident


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors"


class PinnedArena:
    """Page-locked host memory for blocks, carved out of power-of-two slabs.

    PyTorch's pinned allocator rounds every allocation up to a power of two: pinning
    each 1.23 GB layer of a 30B model on its own would take 2 GiB apiece. Slabs of
    exactly a power of two, each holding several blocks, waste at most the tail of
    each slab (about 1/8 with ``per_slab=8``).

    Args:
        allocate: ``allocate(nbytes)`` returns a 1-D uint8 host tensor (pinned).
        largest: bytes of the largest block to be placed.
        total: bytes of all blocks to be placed.
    """

    def __init__(self, allocate: Callable[[int], torch.Tensor], largest: int, total: int,
                 per_slab: int = 8, minimum: int = 64 << 20) -> None:
        self._allocate = allocate
        self.slab_bytes = _pow2_ceil(max(per_slab * largest, minimum))
        self.slabs: list[torch.Tensor] = []
        self._used = 0
        self._remaining = total  # bytes still to be placed: the last slabs shrink to fit

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not self.slabs or self._used + nbytes > self.slabs[-1].numel():
            want = max(self._remaining, nbytes)
            size = self.slab_bytes
            if want < size:
                floor = _pow2_ceil(want) // 2 if want & (want - 1) else want
                size = floor if floor >= nbytes else _pow2_ceil(want)
            self.slabs.append(self._allocate(size))
            self._used = 0
        piece = self.slabs[-1][self._used: self._used + nbytes]
        self._used += -(-nbytes // 256) * 256
        self._remaining -= nbytes
        return piece.view(dtype)


def _pow2_ceil(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def host_blocks(blocks: Sequence[Block], host_dtype: torch.dtype | None,
                disk_dir: str | None, host_budget_bytes: float) -> list[Block]:
    """The blocks :func:`populate` keeps in host memory (the others go to disk): in
    order, each that still fits in ``host_budget_bytes`` (all without ``disk_dir``)."""
    kept, used = [], 0.0
    for block in blocks:
        nbytes = block.host_bytes(host_dtype)
        if disk_dir is None or used + nbytes <= host_budget_bytes:
            kept.append(block)
            used += nbytes
    return kept


def populate(blocks: Sequence[Block], host_dtype: torch.dtype | None, disk_dir: str | None,
             host_budget_bytes: float, *,
             allocate: Callable[[int, torch.dtype], torch.Tensor],
             placeholder: Callable[[torch.dtype], torch.Tensor],
             weights: Callable[[str], torch.Tensor] | None = None, suffix: str = "") -> None:
    """Move each block's parameters into its flat host buffer, leaving placeholders.

    Blocks are kept in host memory (``allocate(numel, dtype)``) in order until
    ``host_budget_bytes`` is used; the rest go to memory-mapped files under
    ``disk_dir``. ``placeholder(dtype)`` gives the one-element device tensor each
    parameter is expanded from. Parameters still on ``meta`` are read from
    ``weights(name)``. A sharded block (:meth:`Block.shard`) keeps only its slice;
    ``suffix`` tells the slices' files apart. Peak extra memory: one block.
    """
    in_host = {id(b) for b in host_blocks(blocks, host_dtype, disk_dir, host_budget_bytes)}
    for block in blocks:
        dtype = host_dtype or block.compute_dtype
        lo, hi = block.lo, block.hi
        to_disk = id(block) not in in_host
        flat = torch.empty(hi - lo, dtype=dtype) if to_disk else allocate(hi - lo, dtype)
        flat.zero_()  # alignment gaps are part of every transfer: keep them defined
        with torch.no_grad():
            for entry, a, b in block.overlaps(lo, hi):
                meta = entry.param.is_meta
                if meta and weights is None:
                    raise ValueError(f"{entry.name} is on the meta device and no weights given")
                source = weights(entry.name) if meta else entry.param.data
                flat[a - lo: b - lo].copy_(source.reshape(-1)[a - entry.offset: b - entry.offset])
        if to_disk:
            path = Path(disk_dir) / _file_name(block.name + suffix)
            layout = {"slice": [lo, hi], "entries": [
                {"name": e.name, "offset": e.offset, "shape": list(e.shape)}
                for e in block.entries]}
            write_flat(path, flat, layout)
            del flat
            block.disk = map_flat(path, hi - lo, dtype)
            block.host = block.disk.tensor
        else:
            block.host = flat
        if block.codes:  # the frozen codes lane, always in host memory
            if to_disk:
                raise ConfigError(f"offload: block {block.name} holds quantized codes, which "
                                  "the disk tier does not take; raise offload.host_budget_gb")
            codes = allocate(block.codes_numel, torch.uint8)
            codes.zero_()
            for e in block.codes:
                block.code_view(codes, e).copy_(e.param.data)
            block.codes_host = codes
        for entry in block.entries + block.codes:
            assign(entry.param, placeholder(entry.param.dtype).expand(entry.shape))


WIDENS = (torch.float16, torch.bfloat16, torch.float32)  # float32 holds each exactly


def _block_dtype(block: Block) -> torch.dtype:
    """The dtype of ``block``'s flat buffer: its parameters' one dtype, or float32 for
    a mix of 16- and 32-bit floats (a widened block)."""
    dtypes = {e.param.dtype for e in block.entries}
    if len(dtypes) <= 1:
        return dtypes.pop() if dtypes else torch.float32
    if not dtypes <= set(WIDENS):
        raise ConfigError(f"offload: unit {block.name} mixes dtypes "
                          f"{sorted(map(str, dtypes))}; a block holds one float dtype, "
                          "widened to float32 only from 16- and 32-bit floats")
    return torch.float32


def check_host_memory(local_ranks: int, pinned_bytes: int, available: int | None = None,
                      freed: int = 0) -> None:
    """ConfigError when the node's ranks would pin more host memory than is available.

    Page-locked memory cannot be swapped out: ``local_ranks`` processes pinning
    ``pinned_bytes`` each beyond what the host has would end in the OOM killer, after
    minutes of loading. ``available``: bytes (default: ``MemAvailable`` of
    ``/proc/meminfo``; no check where it cannot be read); ``freed``: bytes each rank
    gives back while pinning (its model's own CPU copy of the offloaded parameters).
    """
    if available is None:
        available = host_available_bytes()
    if available is not None:
        available += local_ranks * freed
    need = local_ranks * pinned_bytes
    if available is None or need <= available:
        return
    raise ConfigError(
        f"offload: {local_ranks} rank(s) on this node would pin {local_ranks} x "
        f"{pinned_bytes / 2**30:.1f} GiB = {need / 2**30:.1f} GiB of host memory, but only "
        f"{available / 2**30:.1f} GiB are available: turn on parallel.slicing (each rank "
        f"keeps 1/N of the model; needs GPUs with peer access), put blocks on disk "
        f"(offload.disk_dir with offload.host_budget_gb), or run fewer ranks per node")


def host_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
