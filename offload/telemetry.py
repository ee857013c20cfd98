"""Offload telemetry: bytes moved, bandwidth, stalls, device memory, NVML readings.

Transfers are timed with events recorded around each copy (CUDA timing events on a
GPU, wall-clock :class:`~zo2.offload.device.HostEvent` on the CPU). Nothing here
blocks: a pass's events are read once they have completed (``query()``), so a copy
still in flight at the end of a step is counted in the next report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from zo2.offload.device import Device


@dataclass
class _Timed:
    kind: str  # "up" | "down" | "wait"
    nbytes: int
    start: object
    end: object


@dataclass
class TransferStats:
    """Counters of one reporting period (normally one training step)."""

    up_bytes: int = 0
    down_bytes: int = 0
    uploads: int = 0
    writebacks: int = 0
    up_ms: float = 0.0
    down_ms: float = 0.0
    wait_ms: float = 0.0
    _inflight: list[_Timed] = field(default_factory=list)

    def add(self, kind: str, nbytes: int, start, end) -> None:
        self._inflight.append(_Timed(kind, nbytes, start, end))

    def harvest(self) -> None:
        """Fold completed events into the counters; keep the rest for later."""
        pending = []
        for t in self._inflight:
            if not t.end.query():
                pending.append(t)
                continue
            ms = t.start.elapsed_time(t.end)
            if t.kind == "up":
                self.up_bytes, self.uploads, self.up_ms = (
                    self.up_bytes + t.nbytes, self.uploads + 1, self.up_ms + ms)
            elif t.kind == "down":
                self.down_bytes, self.writebacks, self.down_ms = (
                    self.down_bytes + t.nbytes, self.writebacks + 1, self.down_ms + ms)
            else:
                self.wait_ms += ms
        self._inflight = pending

    def report(self) -> dict[str, float]:
        """The period's figures, then reset (in-flight transfers carry over)."""
        self.harvest()
        out = {
            "offload_up_mb": self.up_bytes / 2**20,
            "offload_down_mb": self.down_bytes / 2**20,
            "offload_uploads": self.uploads,
            "offload_writebacks": self.writebacks,
            "offload_up_gbps": _rate(self.up_bytes, self.up_ms),
            "offload_down_gbps": _rate(self.down_bytes, self.down_ms),
            "offload_wait_s": self.wait_ms / 1e3,
        }
        self.up_bytes = self.down_bytes = self.uploads = self.writebacks = 0
        self.up_ms = self.down_ms = self.wait_ms = 0.0
        return out


def storage_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes of the distinct storages of ``tensors`` on ``device``.

    Zero-stride tensors (the expanded one-element placeholders of offloaded
    parameters) count as nothing.
    """
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device != device or (t.dim() and all(x == 0 for x in t.stride())):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _rate(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e6) if ms > 0 else 0.0


def gpu_metrics(device: Device) -> dict[str, float]:
    """GPU memory and utilisation (torch allocator and NVML); empty on the CPU.

    ``gpu_peak_allocated_gb`` is the peak since the previous call (the counter is reset),
    so a caller that collects on logged steps only gets the peak of the steps between.
    """
    if not device.is_cuda:
        return {}
    out: dict[str, float] = {
        "gpu_allocated_gb": device.allocated_bytes() / 2**30,
        "gpu_peak_allocated_gb": device.peak_allocated_bytes() / 2**30,
    }
    device.reset_peak()
    handle = _nvml_handle(device)
    if handle is not None:
        try:
            memory = _nvml.nvmlDeviceGetMemoryInfo(handle)
            util = _nvml.nvmlDeviceGetUtilizationRates(handle)
            out.update(gpu_used_gb=memory.used / 2**30, gpu_util_pct=float(util.gpu))
        except Exception:  # NVML refused this reading: report what torch knows
            pass
    return out


_nvml = None  # the pynvml module once nvmlInit succeeded; False: NVML is unusable here
_handles: dict[int, object] = {}


def _nvml_handle(device: Device):
    """The NVML handle of a CUDA device, or None without NVML (initialised once).

    Found by the device's UUID, else its PCI bus id: NVML numbers all GPUs of the
    machine, while the CUDA index counts the visible ones only (``CUDA_VISIBLE_DEVICES``
    remaps it), so ``cuda:0`` may be NVML's GPU 3.
    """
    global _nvml
    index = device.device.index or 0
    if index in _handles:
        return _handles[index]
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # NVML missing or not permitted
            _nvml = False
    handle = None
    if _nvml:
        handle = nvml_lookup(_nvml, *device.nvml_keys())
    _handles[index] = handle
    return handle


def nvml_lookup(nvml, uuid: str | None, pci_bus_id: str | None):
    """The NVML handle of the GPU with ``uuid`` (``GPU-...``), else ``pci_bus_id``."""
    for lookup, key in ((nvml.nvmlDeviceGetHandleByUUID, uuid),
                        (nvml.nvmlDeviceGetHandleByPciBusId, pci_bus_id)):
        if key is None:
            continue
        try:
            return lookup(key)
        except Exception:  # not found under this key (older driver, MIG): try the next
            continue
    return None
