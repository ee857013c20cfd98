"""DistZO2 on the CPU: data parallelism (DDP) and perturbation parallelism (PertP), 2 ranks.

At the OPT-125m shape (random weights, fp32), a global batch of B x seq tokens (default
8 x 128), classification loss at the last position, MeZO (one direction, two-sided).
Every process runs ONE thread (torch intra-op, OpenMP, MKL and the numba noise kernels
all set to 1), so the comparison is 2 processes x 1 thread against 1 process x 1
thread. ``single_2threads_step_s`` is one process using both cores, for reference.

* single: one process, a single-process mesh (``Mesh.local()``), the whole batch; its
  one forward stacks the +eps and -eps slices (2B rows).
* DDP(2): ``dp=2``; both ranks are handed the same global batch and keep B/2 rows each
  (+eps and -eps slices of B/2 rows); one all-reduce of (loss, count) x 2 per step.
* PertP(2): ``pertp=2``; both ranks get the whole batch, rank 0 runs the +eps slice and
  rank 1 the -eps slice (B rows each).

Only the forward work is divided: every rank, like the single process, still draws z
for every weight twice per step (the +eps weights, and the previous step's update;
the -eps weights are a mirror), about 0.6 s at OPT-125m on one core, and DDP's ranks
run half-size slices (smaller matrix products). That keeps the ratios from 2 and 0.5.

How it is measured. This machine's speed drifts by 10-20% over minutes (a shared
host), so the configurations are interleaved step by step in ONE torchrun job of two
processes, each holding its own model copy per configuration: a round is one step of
single (rank 0 alone, 1 thread, while rank 1 blocks in a barrier and uses almost no CPU; its
CPU seconds meanwhile are recorded as ``idle_rank_cpu_s``), one of DDP(2), one of
PertP(2), one of single with 2 threads (rank 0 alone again), and one each of
``ddp2_alone`` and ``pertp2_alone``: one rank's share of a DDP(2) / PertP(2) step (the
library's own row and slice selection, the -eps slice for PertP) run on rank 0 while
the other core idles. ``single_step_s / ddp2_rank_alone_s`` is thus the speedup the
library's split of the work allows; the gap to ``ddp2_speedup`` is what running two
processes in lockstep costs here: each step waits for the slower rank, and with this
host's jitter the slower of two ranks is slower than the median rank (compare the
per-rank CPU seconds in the JSON), plus any contention for caches and memory.
Every configuration first runs 1 warm-up step; then ``--rounds`` rounds; medians are
reported (the JSON adds the medians of the per-round ratios, ``per_round_median``). A
step's time is the slowest rank's, from a common barrier. ``ddp_bytes_per_step`` is
``mesh.bytes_sent`` per step and rank (no weight checksums: ``check_every=0``);
``ddp_bytes_per_step_small`` the same for a hidden 256 x 4 layers OPT on the same mesh.
``load_start`` / ``load_end`` are the 1-minute load averages (other jobs may share the
machine and then slow every figure). The JSON also holds each step's per-rank wall and
CPU seconds (``steps``); CPU close to wall means the rank was not waiting for a core.
The parent launches the job (this module with ``--worker``), reads the JSON rank 0
writes, and computes the ratios.

    python -m bench.parallel_cpu [--rounds 10] [--batch 8] [--seq 128]

Last line: ``ddp2_speedup=... pertp2_step_ratio=... ddp_bytes_per_step=...
ddp_bytes_per_step_small=... single_step_s=... ddp2_step_s=... pertp2_step_s=...
single_2threads_step_s=... ddp2_rank_alone_s=... pertp2_rank_alone_s=... batch=...
seq=... load_start=... load_end=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = (5, 9)
SMALL = dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
             word_embed_proj_dim=256)
ORDER = ("single", "ddp2", "pertp2", "single_2threads", "ddp2_alone", "pertp2_alone")
ALONE = ("single", "single_2threads", "ddp2_alone", "pertp2_alone")  # rank 0 only
SMALL_STEPS = 3


# ---- worker: rank r of the two-process torchrun job -----------------------------------
def small_shape(seed: int = 0):
    """A random OPT of hidden 256 x 4 layers (same vocabulary as OPT-125m)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SMALL)
    config.use_cache = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
    return model.eval().requires_grad_(False)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import zo2.noise
    from bench.common import classification_batch, opt_shape
    from zo2 import Objective, OptimConfig, ZOEngine
    from zo2.config import ParallelConfig
    from zo2.parallel import LaunchEnv, Mesh, ProcessGroups

    class SoloMesh(Mesh):
        """Rank 1's share of a dp x pertp step, run alone: the real rows and slices, no
        peer (no process group is joined; the other ranks' losses are copies)."""

        def __init__(self, dp: int, pertp: int, rank: int = 1) -> None:
            self.config = ParallelConfig(dp=dp, pertp=pertp, check_every=0)
            self.env = LaunchEnv(rank=rank, world=dp * pertp, local_world=1)
            self.dp, self.pertp, self.rank, self.world = dp, pertp, rank, dp * pertp
            self.dp_rank, self.pertp_rank = divmod(rank, pertp)
            self.device, self.groups = torch.device("cpu"), ProcessGroups()

        @property
        def is_main(self) -> bool:
            return True

        def combine_losses(self, n: int, mine) -> list[float]:
            own = [mine[i][0] for i in sorted(mine)]  # the missing slices: copies
            return [own[i % len(own)] for i in range(n)]

    def threads(n: int) -> None:
        torch.set_num_threads(n)
        zo2.noise.set_num_threads(n)

    def engine(model, mesh):
        return ZOEngine(model, OptimConfig(lr=1e-7, eps=1e-3),
                        Objective("label_words", candidates=torch.tensor(LABELS)), seed=0,
                        mesh=mesh)

    load_start = os.getloadavg()[0]
    threads(1)
    cpu = torch.device("cpu")
    ddp_mesh = Mesh(ParallelConfig(dp=2, pertp=1, check_every=0), cpu)
    pertp_mesh = Mesh(ParallelConfig(dp=1, pertp=2, check_every=0), cpu)
    assert ddp_mesh.world == 2, "launch with torchrun --nproc_per_node=2"
    rank, meshes = ddp_mesh.rank, {"ddp2": ddp_mesh, "pertp2": pertp_mesh}
    engines = {name: engine(opt_shape(), mesh) for name, mesh in meshes.items()}
    if rank == 0:  # the engines that run alone live on rank 0 only
        engines["single"] = engines["single_2threads"] = engine(opt_shape(), Mesh.local())
        engines["ddp2_alone"] = engine(opt_shape(), SoloMesh(dp=2, pertp=1))
        engines["pertp2_alone"] = engine(opt_shape(), SoloMesh(dp=1, pertp=2))  # -eps + mirror
    vocab = engines["ddp2"].model.config.vocab_size
    batch = classification_batch(args.batch, args.seq, vocab, LABELS)  # same on both ranks

    def step(name: str) -> dict | None:
        """One step of ``name``; every rank's wall and CPU seconds (on rank 0)."""
        alone = name in ALONE
        runs = not alone or rank == 0
        if runs and name == "single_2threads":
            threads(2)
        ddp_mesh.barrier()
        wall, used, sent = time.perf_counter(), time.process_time(), 0
        if runs:
            mesh = engines[name].mesh
            before = mesh.bytes_sent
            engines[name].step(batch)
            sent = mesh.bytes_sent - before if not alone else 0
        wall = time.perf_counter() - wall
        threads(1)
        if alone:
            ddp_mesh.barrier()  # rank 1 waits here, idle, until rank 0's step is done
        used = time.process_time() - used
        figures = torch.zeros(2, 2, dtype=torch.float64)
        figures[rank] = torch.tensor([wall, used])
        dist.all_reduce(figures)  # plain gloo, outside mesh.bytes_sent
        if alone:  # rank 1's wall time is the barrier's; only its CPU seconds count
            return {"s": figures[0, 0].item(), "cpu": [figures[0, 1].item()],
                    "idle_rank_cpu_s": figures[1, 1].item(), "bytes": sent}
        return {"s": figures[:, 0].max().item(), "rank_s": figures[:, 0].tolist(),
                "cpu": figures[:, 1].tolist(), "bytes": sent}

    for name in ORDER:  # warm-up: numba kernels, scratch buffers, thread pools
        step(name)
    steps: dict[str, list] = {name: [] for name in ORDER}
    for _ in range(args.rounds):
        for name in ORDER:
            steps[name].append(step(name))

    # model-size independence of the bytes: a small OPT on the same DDP mesh
    small = engine(small_shape(), meshes["ddp2"])
    steps["ddp2_small"] = []
    for _ in range(SMALL_STEPS):
        before = small.mesh.bytes_sent
        small.step(classification_batch(args.batch, args.seq, vocab, LABELS))
        steps["ddp2_small"].append({"bytes": small.mesh.bytes_sent - before})

    if rank == 0:
        record = {"steps": steps, "load_start": load_start, "load_end": os.getloadavg()[0],
                  "torch_threads": torch.get_num_threads(),
                  "noise_threads": zo2.noise.get_num_threads(),
                  "meshes": {"ddp2": ddp_mesh.describe(), "pertp2": pertp_mesh.describe()},
                  "params_m": {name: sum(p.numel() for p in e.model.parameters()) / 1e6
                               for name, e in (("opt-125m", engines["ddp2"]), ("small", small))}}
        Path(args.out).write_text(json.dumps(record))
    ddp_mesh.barrier()


# ---- parent: launch the job, compute the ratios ----------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from bench.common import RESULTS, ROOT, median, report

    torch.set_num_threads(1)  # report() records this (idle) parent's threads
    load_start = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--module", "bench.parallel_cpu", "--worker",
               "--out", str(out), "--batch", str(args.batch), "--seq", str(args.seq),
               "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                              cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        record = json.loads(out.read_text())
    load_end = os.getloadavg()[0]
    steps = record["steps"]
    for name in ORDER:
        print(f"{name}: {[round(s['s'], 2) for s in steps[name]]} s", file=sys.stderr)

    def step_s(name: str) -> float:
        return median([s["s"] for s in steps[name]])

    def bytes_per_step(name: str) -> int:
        sent = {s["bytes"] for s in steps[name]}
        assert len(sent) == 1, f"{name}: bytes per step vary: {sorted(sent)}"
        return sent.pop()

    def per_round(a: str, b: str) -> float:  # median over rounds of a's time / b's
        return median([x["s"] / y["s"] for x, y in zip(steps[a], steps[b])])

    single, ddp2, pertp2 = step_s("single"), step_s("ddp2"), step_s("pertp2")
    report("parallel_cpu", {
        "ddp2_speedup": (args.batch / ddp2) / (args.batch / single),  # samples/s over samples/s
        "pertp2_step_ratio": pertp2 / single,
        "ddp_bytes_per_step": bytes_per_step("ddp2"),
        "ddp_bytes_per_step_small": bytes_per_step("ddp2_small"),
        "single_step_s": single, "ddp2_step_s": ddp2, "pertp2_step_s": pertp2,
        "single_2threads_step_s": step_s("single_2threads"),
        "ddp2_rank_alone_s": step_s("ddp2_alone"), "pertp2_rank_alone_s": step_s("pertp2_alone"),
        "batch": args.batch, "seq": args.seq,
        "load_start": load_start, "load_end": load_end,
    })
    path = RESULTS / "parallel_cpu.json"  # add the worker's raw record to report()'s
    result = json.loads(path.read_text())
    result["per_round_median"] = {"ddp2_speedup": per_round("single", "ddp2"),
                                  "pertp2_step_ratio": per_round("pertp2", "single")}
    result["worker"] = record
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
