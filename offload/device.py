"""The one place that talks to the accelerator runtime: streams, events, pinned memory.

Every other module of :mod:`zo2.offload` goes through :class:`Device`, so the same
scheduler code runs on CUDA and on the CPU. On the CPU the "device" is host memory:
copies are synchronous, streams are ``None`` and events are :class:`HostEvent`, which
record the wall-clock time and are always complete. Nothing here calls
``torch.cuda.synchronize()``; waiting is always on one event.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class HostEvent:
    """A CPU stand-in for ``torch.cuda.Event``: complete as soon as it is recorded."""

    def __init__(self) -> None:
        self.time = time.perf_counter()

    def record(self, stream: object = None) -> None:
        self.time = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to ``end`` (as ``torch.cuda.Event``)."""
        return (end.time - self.time) * 1e3


class Device:
    """A compute device (``cuda:N`` or ``cpu``) and its side streams.

    Args:
        device: the working device; parameters are computed on it.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def __repr__(self) -> str:
        return f"Device({self.device})"

    # ---- streams and events ---------------------------------------------------------
    def new_stream(self) -> torch.cuda.Stream | None:
        """A side stream (CUDA), or None on the CPU where work is synchronous."""
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def compute_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def event(self, timing: bool = False) -> torch.cuda.Event | HostEvent:
        return torch.cuda.Event(enable_timing=timing) if self.is_cuda else HostEvent()

    def record(self, stream: torch.cuda.Stream | None, timing: bool = False):
        """A new event recorded on ``stream`` now."""
        event = self.event(timing)
        event.record(stream) if self.is_cuda else event.record()
        return event

    @staticmethod
    def wait(stream: torch.cuda.Stream | None, event) -> None:
        """Make ``stream`` wait for ``event`` (no host blocking); a no-op on the CPU."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Issue the enclosed work on ``stream`` (no-op on the CPU)."""
        if stream is None:
            yield
        else:
            with torch.cuda.stream(stream):
                yield

    # ---- memory ---------------------------------------------------------------------
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat host buffer, page-locked when there is a GPU to DMA from it."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.is_cuda)

    def allocated_bytes(self) -> int | None:
        """Bytes the caching allocator holds for tensors (None on the CPU)."""
        return torch.cuda.memory_allocated(self.device) if self.is_cuda else None

    def peak_allocated_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.is_cuda else None

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peers_connected(self, n: int) -> bool:
        """Whether GPUs 0..n-1 can all reach each other directly (NVLink / P2P)."""
        if not self.is_cuda or torch.cuda.device_count() < n:
            return False
        return all(torch.cuda.can_device_access_peer(a, b)
                   for a in range(n) for b in range(n) if a != b)

    def nvml_keys(self) -> tuple[str | None, str | None]:
        """(UUID as NVML writes it, ``GPU-...``; PCI bus id ``dddddddd:bb:dd.0``): how
        NVML finds this GPU whatever ``CUDA_VISIBLE_DEVICES`` did to its index."""
        props = torch.cuda.get_device_properties(self.device)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            uuid = str(uuid)
            uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        bus = getattr(props, "pci_bus_id", None)
        pci = None if bus is None else (f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:"
                                        f"{getattr(props, 'pci_device_id', 0):02x}.0")
        return uuid, pci
