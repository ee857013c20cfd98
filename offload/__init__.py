"""ZO2 offloading: units live in host memory (or on disk) and stream through the device.

* :mod:`~zo2.offload.store`: one flat host buffer per offloaded unit (a *block*).
* :mod:`~zo2.offload.scheduler`: the ring of K device buffers, the upload and
  write-back streams and their events, the update fused into the residency.
* :mod:`~zo2.offload.disk`: memory-mapped safetensors files for the disk tier.
* :mod:`~zo2.offload.device`: the only module that calls the CUDA runtime.
* :mod:`~zo2.offload.telemetry`: bytes, bandwidth, stalls, NVML readings.

Switched on through :class:`zo2.config.OffloadConfig` (``offload.enabled=true``);
:class:`zo2.ZOEngine` keeps its API.
"""

from zo2.offload.device import Device
from zo2.offload.scheduler import Offloader

__all__ = ["Device", "Offloader"]
