"""Disk tier: a block's flat host buffer as a memory-mapped safetensors file.

Each block on disk is one ``.safetensors`` file holding a single 1-D tensor
``flat`` (and, in the metadata, the name, offset and shape of every parameter in it,
so the file is self-describing). The file is mapped shared and writable: the tensor
returned by :func:`map_flat` *is* the file's data region, so an update written to it
lands in the page cache and reaches the disk without an explicit save, and the
kernel pages it in on demand. A model larger than host memory therefore trains with
only the blocks in use resident; :meth:`DiskBuffer.prefetch` asks the kernel to read
the next block ahead of its use (``madvise(MADV_WILLNEED)``).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

_HEADER_LEN = struct.Struct("<Q")


class DiskBuffer:
    """A writable, shared memory map of one flat tensor stored in a safetensors file."""

    def __init__(self, path: Path, numel: int, dtype: torch.dtype) -> None:
        self.path = path
        self._file = open(path, "r+b")  # noqa: SIM115 (lives as long as the mapping)
        self._map = mmap.mmap(self._file.fileno(), 0)
        (header_len,) = _HEADER_LEN.unpack_from(self._map, 0)
        header = json.loads(self._map[8: 8 + header_len])
        begin, end = header["flat"]["data_offsets"]
        self._start = 8 + header_len + begin
        self._nbytes = end - begin
        item = torch.empty((), dtype=dtype).element_size()
        if self._nbytes != numel * item:
            raise ValueError(f"{path}: flat holds {self._nbytes} bytes, expected {numel * item}")
        self.tensor = torch.frombuffer(self._map, dtype=dtype, count=numel, offset=self._start)

    def prefetch(self) -> None:
        """Ask the kernel to read the whole buffer into the page cache, asynchronously."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        start = self._start - self._start % page
        self._map.madvise(mmap.MADV_WILLNEED, start, self._start + self._nbytes - start)

    def sync(self) -> None:
        """Write dirty pages back to the file (before a checkpoint is declared done)."""
        self._map.flush()


def write_flat(path: Path, flat: torch.Tensor, layout: dict) -> None:
    """Create ``path`` holding ``flat`` (1-D, CPU) with ``layout`` in its metadata.

    ``layout``: ``{"slice": [lo, hi], "entries": [{"name", "offset", "shape"}, ...]}``,
    offsets into the whole block, of which the file holds elements ``[lo, hi)``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"flat": flat.contiguous()}, str(path), metadata={"zo2_layout": json.dumps(layout)})


def map_flat(path: Path, numel: int, dtype: torch.dtype) -> DiskBuffer:
    """Map the ``flat`` tensor of a file written by :func:`write_flat`."""
    return DiskBuffer(path, numel, dtype)
