"""ZO2 offloading: units live in host memory (or on disk) and stream through the device.

* :mod:`~zo2.offload.store`: one flat host buffer per offloaded unit (a *block*).
* :mod:`~zo2.offload.plan`: which units are offloaded, the host and wire dtypes.
* :mod:`~zo2.offload.scheduler`: the hot path (:class:`Offloader`): the ring of K
  device buffers blocks stream through, the update fused into the residency.
* :mod:`~zo2.offload.transfers`: the upload and write-back streams, their events,
  the staging buffers.
* :mod:`~zo2.offload.weights`: the weights' state outside steps
  (:class:`OffloadedWeights`, ``Offloader.store``): export, checkpoints, loading,
  the update rule's state (with slicing: :mod:`~zo2.offload.sliced_state`).
* :mod:`~zo2.offload.disk`: memory-mapped safetensors files for the disk tier.
* :mod:`~zo2.offload.device`: the only module that calls the CUDA runtime.
* :mod:`~zo2.offload.telemetry`: bytes, bandwidth, stalls, NVML readings.

Switched on through :class:`zo2.config.OffloadConfig` (``offload.enabled=true``);
:class:`zo2.ZOEngine` keeps its API.
"""

from zo2.offload.device import Device
from zo2.offload.scheduler import Offloader
from zo2.offload.weights import OffloadedWeights

__all__ = ["Device", "OffloadedWeights", "Offloader"]
