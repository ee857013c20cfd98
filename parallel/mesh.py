"""One mesh object: validates the parallel degrees and builds every process group.

The world is a ``dp x pp`` grid; rank ``r`` sits at ``dp_rank = r // pp``,
``pp_rank = r % pp``, so the ranks of a perturbation group are neighbours (on one node
when ``pp`` divides the GPUs per node). ZO communicates scalars only, so no device
group per grid dimension is built (a ``DeviceMesh`` would create NCCL communicators no
collective uses); the groups are:

* a *host group* (gloo) for the few scalars ZO communicates (losses, evaluation sums,
  checksums), so they never need a device tensor, also when the mesh uses NCCL;
* a *slice group*: the ranks of one node (``LOCAL_WORLD_SIZE`` of them, from the
  launcher), which share the uploads of offloaded units (:mod:`zo2.offload`).

Ranks, local ranks and node sizes are read from the launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``: torchrun, the deepspeed
launcher and Ray set them), so nothing assumes one node. Degrees that do not fit the
world size are rejected on every rank before any communication, so a bad mesh ends
with the same clear message everywhere instead of a hang.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zo2.config import ParallelConfig
from zo2.errors import ConfigError, DistributedError, ZO2Error

log = logging.getLogger("zo2")


@contextmanager
def collective(what: str, timeout_s: float, setting: str = "parallel.timeout_s"):
    """Turn a failed collective into one clear DistributedError.

    gloo and NCCL raise when a peer's connection closes (it died) or when the operation
    waits longer than the process group's timeout (it hangs); either way this rank
    stops with a message naming the operation, and the launcher ends or restarts the
    job (``torchrun --max-restarts`` resumes it from the last checkpoint).
    """
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError and backend errors
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedError(
            f"rank {rank}: {what} failed: another rank died or hung longer than "
            f"{setting}={timeout_s:g} s ({first})") from err


def resolve_degrees(dp: int, pp: int, world: int) -> tuple[int, int]:
    """Fill in a ``-1`` degree and check ``dp * pp == world``; ConfigError otherwise."""
    if dp == -1:
        if world % pp:
            raise ConfigError(f"parallel.pp={pp} does not divide the world size {world}")
        dp = world // pp
    if pp == -1:
        if world % dp:
            raise ConfigError(f"parallel.dp={dp} does not divide the world size {world}")
        pp = world // dp
    if dp * pp != world:
        raise ConfigError(f"parallel: dp={dp} x pp={pp} = {dp * pp} processes, but the world "
                          f"size is {world} (set dp and pp so that dp x pp = {world})")
    return dp, pp


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


class Mesh:
    """The ``dp x pp`` process grid, its groups, and this rank's coordinates.

    Args:
        config: degrees, backend and timeout (:class:`~zo2.config.ParallelConfig`).
        device: this rank's compute device (``cuda:LOCAL_RANK`` on GPUs).
        env: the launch environment (default: read from ``os.environ``).
    """

    def __init__(self, config: ParallelConfig, device: torch.device,
                 env: LaunchEnv | None = None) -> None:
        self.config = config
        self.env = env or LaunchEnv.read()
        self.dp, self.pp = resolve_degrees(config.dp, config.pp, self.env.world)
        if self.env.world == 1 and -1 in (config.dp, config.pp):
            log.warning("parallel: dp=%d pp=%d asks for the launcher's processes, but this "
                        "run was started as one process: it runs single-process; start it "
                        "with torchrun --nproc_per_node=N (or the deepspeed launcher, or "
                        "python -m zo2.launch.ray_job --workers N)", config.dp, config.pp)
        self.rank, self.world = self.env.rank, self.env.world
        self.dp_rank, self.pp_rank = divmod(self.rank, self.pp)
        self.device = device
        self.host_group = None
        self.slice_group = self.slice_host_group = None
        self.save_group = None
        if self.world > 1:
            self._init_groups()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def _init_groups(self) -> None:
        timeout = timedelta(seconds=self.config.timeout_s)
        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.backend, timeout=timeout, **_attempt_store(timeout))
        if dist.get_backend() == "gloo":
            self.host_group = dist.group.WORLD
        else:
            self.host_group = dist.new_group(backend="gloo", timeout=timeout)
        local = self.env.local_world
        if self.world % local:
            raise ConfigError(f"LOCAL_WORLD_SIZE={local} does not divide WORLD_SIZE={self.world}")
        self.save_group = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=self.config.save_timeout_s))
        self.slice_group, _ = dist.new_subgroups(group_size=local)
        if dist.get_backend() == "gloo":
            self.slice_host_group = self.slice_group
        else:
            self.slice_host_group, _ = dist.new_subgroups(group_size=local, backend="gloo")

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
                dist.barrier(group=self.save_group)

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
        return {"world": self.world, "dp": self.dp, "pp": self.pp, "rank": self.rank,
                "dp_rank": self.dp_rank, "pp_rank": self.pp_rank,
                "local_world": self.env.local_world, "backend": self.backend}
