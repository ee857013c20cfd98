"""DistZO2 parallelism on torch.distributed.

* :mod:`~zo2.parallel.mesh`: the ``dp x pertp`` mesh (data parallel x perturbation
  parallel), its process groups, the launch environment, validation of the degrees; a
  run started as one process has a single-process mesh (:meth:`Mesh.local`).
* :mod:`~zo2.parallel.comm`: the scalars ZO communicates per step (losses), evaluation
  sums and cross-rank checksums, as methods of the mesh; no weight or gradient tensor
  crosses the network.
* :mod:`~zo2.parallel.slicing`: slicing of offloaded units over a node's ranks; the
  offloader (:mod:`zo2.offload`) takes the mesh's slice group.
"""

from zo2.parallel.mesh import LaunchEnv, Mesh, ProcessGroups, init_process_groups, resolve_degrees

__all__ = ["LaunchEnv", "Mesh", "ProcessGroups", "init_process_groups", "resolve_degrees"]
