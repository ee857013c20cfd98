"""The same 2-rank DDP job through torchrun and through the deepspeed launcher.

Both launchers only start processes and set the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); the job itself is the same code with the same sharding, so the two end
bitwise equal, and equal to the single-process run with the same global batch up to float
rounding. The deepspeed run compiles nothing: zo2 creates its gloo process group through
torch.distributed, so DeepSpeed's CPU communication extension is never built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = ["model=tiny-llama", "steps=3", "eval_every=0", "log_every=1", "optim.lr=1e-2",
          "task.n_train=24", "task.n_dev=12", "task.n_test=12", "task.max_length=48",
          "optim.batch_size=4", "eval_batch_size=12", "progress=false"]
ENTRY = ["-m", "zo2.launch.train"]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _steps(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "step"]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "best" / "model.safetensors")


def launch(launcher: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run the tiny 2-rank DDP job (or the 1-process reference) through ``launcher``."""
    args = [*COMMON, f"output_dir={out}"]
    if launcher == "single":
        return _run([sys.executable, *ENTRY, *args], cwd)
    args.append("parallel=ddp")
    if launcher == "torchrun":
        return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", *ENTRY, *args], cwd)
    if launcher == "deepspeed":  # == `deepspeed --num_gpus 2 --no_local_rank --module ...`
        return _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                     "--master_port", str(_free_port()), "--no_local_rank", "--module",
                     "zo2.launch.train", *args], cwd)
    raise ValueError(launcher)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folders by launcher name, each job launched once per module on first use."""
    root = tmp_path_factory.mktemp("launchers")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            proc = launch(name, root / name, root)
            if name != "single":
                assert proc.stdout.count("tuned test acc") == 1  # the main rank reports
                par = json.loads((root / name / "summary.json").read_text())["parallel"]
                assert par["world"] == 2 and par["local_world"] == 2
            done[name] = root / name
        return done[name]

    return get


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install '.[dist]')")


@needs_deepspeed
def test_deepspeed_launcher_matches_torchrun_bitwise(runs):
    torchrun, ds = runs("torchrun"), runs("deepspeed")
    a, b = _steps(torchrun), _steps(ds)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):  # same code, same shards: bitwise
        assert x["grads"] == y["grads"] and x["loss"] == y["loss"]
    wa, wb = _weights(torchrun), _weights(ds)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


@pytest.mark.slow  # adds the single-process reference: ~95 s with the test above on 2 cores
@needs_deepspeed
def test_both_launchers_match_the_single_process_run(runs):
    ref = _steps(runs("single"))
    for name in ("torchrun", "deepspeed"):
        ours = _steps(runs(name))
        assert len(ours) == len(ref) == 3
        for x, r in zip(ours, ref, strict=True):  # the global batch split over two ranks
            assert x["grads"] == pytest.approx(r["grads"], abs=2e-3)
