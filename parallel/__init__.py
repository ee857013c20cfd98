"""DistZO2 parallelism on torch.distributed.

* :mod:`~zo2.parallel.mesh`: the ``dp x pp`` mesh, its process groups, the launch
  environment, validation of the degrees.
* :mod:`~zo2.parallel.comm`: the scalars ZO communicates per step (losses), evaluation
  sums and cross-rank checksums; no weight or gradient tensor crosses the network.
* Slicing of offloaded units over a node's ranks lives with the offload scheduler
  (:mod:`zo2.offload.scheduler`), which takes the mesh's slice group.
"""

from zo2.parallel.comm import Comm, LocalComm
from zo2.parallel.mesh import LaunchEnv, Mesh, resolve_degrees

__all__ = ["Comm", "LaunchEnv", "LocalComm", "Mesh", "resolve_degrees"]
