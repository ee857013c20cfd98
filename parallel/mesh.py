"""One mesh object: the parallel degrees, the process groups, and ZO's collectives.

The world is a ``dp x pertp`` grid (data parallel x perturbation parallel); rank ``r``
sits at ``dp_rank = r // pertp``, ``pertp_rank = r % pertp``, so the ranks of a
perturbation group are neighbours (on one node when ``pertp`` divides the GPUs per
node). A run started as one process has a single-process mesh (:meth:`Mesh.local`):
the same object, whose collectives (:mod:`zo2.parallel.comm`) communicate nothing.

ZO communicates scalars only, so no device group per grid dimension is built (a
``DeviceMesh`` would create NCCL communicators no collective uses); the groups are:

* a *host group* (gloo) for the few scalars ZO communicates (losses, evaluation sums,
  checksums), so they never need a device tensor, also when the mesh uses NCCL;
* a *slice group*: the ranks of one node (``LOCAL_WORLD_SIZE`` of them, from the
  launcher), which share the uploads of offloaded units (:mod:`zo2.offload`).

The degrees are checked against the world size in :func:`resolve_degrees`; the groups
are built by :func:`init_process_groups`, apart from the mesh. Ranks, local ranks and
node sizes are read from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``: torchrun, the deepspeed launcher and Ray set
them), so nothing assumes one node. Degrees that do not fit the
world size are rejected on every rank before any communication, so a bad mesh ends
with the same clear message everywhere instead of a hang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zo2.config import ParallelConfig
from zo2.errors import ConfigError, ZO2Error
from zo2.parallel.comm import Collectives, collective
from zo2.parallel.slicing import SliceGroup, slice_group

log = logging.getLogger("zo2")


def resolve_degrees(dp: int, pertp: int, world: int) -> tuple[int, int]:
    """Fill in a ``-1`` degree and check ``dp * pertp == world``; ConfigError otherwise."""
    if dp == -1:
        if world % pertp:
            raise ConfigError(f"parallel.pertp={pertp} does not divide the world size {world}")
        dp = world // pertp
    if pertp == -1:
        if world % dp:
            raise ConfigError(f"parallel.dp={dp} does not divide the world size {world}")
        pertp = world // dp
    if dp * pertp != world:
        raise ConfigError(f"parallel: dp={dp} x pertp={pertp} = {dp * pertp} processes, but "
                          f"the world size is {world} (set dp and pertp so that dp x pertp = "
                          f"{world})")
    return dp, pertp


@dataclass(frozen=True)
class LaunchEnv:
    """The process's place in the job, as the launcher describes it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @staticmethod
    def read() -> LaunchEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return LaunchEnv(rank=int(env.get("RANK", 0)), world=world,
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
                         local_world=int(env.get("LOCAL_WORLD_SIZE",
                                                 env.get("LOCAL_SIZE", world))))


def _attempt_store(timeout: timedelta) -> dict:
    """Under an elastic restart, the launcher's key-value store with a prefix per attempt.

    torchrun's agent keeps one store for the whole job; the restarted workers would
    otherwise read the dead workers' addresses for every group after the first (a
    "connection refused" on restart). With the attempt in every key they cannot.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        return {}
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"zo2/attempt-{attempt}", store), "rank": rank,
            "world_size": world}


@dataclass(frozen=True)
class ProcessGroups:
    """The groups of a multi-process mesh (all None on one process).

    ``host``: gloo, for the scalars ZO communicates; ``save``: gloo, with the checkpoint
    timeout; ``slice`` / ``slice_host``: the ranks of one node, for device and host
    tensors (the same gloo group on the CPU).
    """

    host: object = None
    save: object = None
    slice: object = None
    slice_host: object = None


def init_process_groups(config: ParallelConfig, device: torch.device,
                        env: LaunchEnv) -> ProcessGroups:
    """Join the launcher's process group (if not yet) and build the mesh's groups."""
    timeout = timedelta(seconds=config.timeout_s)
    if env.world % env.local_world:
        raise ConfigError(f"LOCAL_WORLD_SIZE={env.local_world} does not divide "
                          f"WORLD_SIZE={env.world}")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = config.backend if config.backend != "auto" else \
            "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout, **_attempt_store(timeout))
    gloo = dist.get_backend() == "gloo"
    host = dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=timeout)
    save = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.save_timeout_s))
    node, _ = dist.new_subgroups(group_size=env.local_world)
    node_host = node if gloo else dist.new_subgroups(group_size=env.local_world,
                                                     backend="gloo")[0]
    return ProcessGroups(host=host, save=save, slice=node, slice_host=node_host)


class Mesh(Collectives):
    """The ``dp x pertp`` process grid, its groups, this rank's coordinates, and ZO's
    scalar collectives (:class:`~zo2.parallel.comm.Collectives`).

    Args:
        config: degrees, backend and timeout (:class:`~zo2.config.ParallelConfig`).
        device: this rank's compute device (``cuda:LOCAL_RANK`` on GPUs).
        env: the launch environment (default: read from ``os.environ``).
    """

    def __init__(self, config: ParallelConfig, device: torch.device,
                 env: LaunchEnv | None = None) -> None:
        self.config = config
        self.env = env or LaunchEnv.read()
        self.dp, self.pertp = resolve_degrees(config.dp, config.pertp, self.env.world)
        if self.env.world == 1 and -1 in (config.dp, config.pertp):
            log.warning("parallel: dp=%d pertp=%d asks for the launcher's processes, but "
                        "this run was started as one process: it runs single-process; start "
                        "it with torchrun --nproc_per_node=N (or the deepspeed launcher, or "
                        "python -m zo2.launch.ray_job --workers N)", config.dp, config.pertp)
        self.rank, self.world = self.env.rank, self.env.world
        self.dp_rank, self.pertp_rank = divmod(self.rank, self.pertp)
        self.device = device
        self.groups = init_process_groups(config, device, self.env) if self.world > 1 \
            else ProcessGroups()

    @classmethod
    def local(cls, device: torch.device | str = "cpu") -> Mesh:
        """A single-process mesh (whatever the environment says): nothing to communicate."""
        return cls(ParallelConfig(), torch.device(device), LaunchEnv())

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_ranks(self) -> int:
        """Processes on this node (each pins its own offloaded blocks)."""
        return self.env.local_world

    @property
    def host_group(self):
        return self.groups.host

    @property
    def backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def slicing(self, device) -> SliceGroup | None:
        """The slice group for offloaded units on ``device`` (:mod:`zo2.parallel.slicing`,
        an :class:`zo2.offload.Device`), or None."""
        return slice_group(self, device)

    def collective(self, what: str):
        """Context for one collective: a dead or hung peer becomes a DistributedError."""
        return collective(what, self.config.timeout_s)

    def barrier(self) -> None:
        if self.distributed:
            with self.collective("barrier"):
                dist.barrier(group=self.host_group)

    def wait_for_writer(self) -> None:
        """All ranks meet once rank 0 has written a checkpoint: on a gloo group whose
        timeout is ``parallel.save_timeout_s`` (writing and hashing a large model takes
        longer than any collective should), not the collective timeout."""
        if self.distributed:
            with collective("wait for the checkpoint write", self.config.save_timeout_s,
                            "parallel.save_timeout_s"):
                dist.barrier(group=self.groups.save)
    def agree(self, value):
        """Rank 0's ``value`` on every rank (e.g. a run directory named by a timestamp)."""
        if not self.distributed:
            return value
        box = [value]
        with self.collective("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def on_main(self, fn):
        """``fn()`` run on rank 0; its result, or the user error it raised, on every rank.

        So a check that only the main rank can make (it owns the output directory)
        ends every rank with the same message instead of leaving them waiting.
        """
        if not self.distributed:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box = [(True, fn())]
            except ZO2Error as err:
                box = [(False, err)]
        with self.collective("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.host_group)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self, wait: bool = True) -> None:
        """Leave the process group: at the end of a run after every rank got there
        (``wait``), or at once on an error path, where a peer may be dead."""
        if self.distributed and dist.is_initialized():
            if wait:
                dist.barrier(group=self.host_group)
            dist.destroy_process_group()

    def describe(self) -> dict:
        return {"world": self.world, "dp": self.dp, "pertp": self.pertp, "rank": self.rank,
                "dp_rank": self.dp_rank, "pertp_rank": self.pertp_rank,
                "local_world": self.env.local_world, "backend": self.backend}
