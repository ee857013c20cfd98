"""The same 2-rank DDP job through torchrun, the deepspeed launcher and a Ray cluster job.

The launchers only start processes and set the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT; Ray also builds the gloo process group); the job itself is the same
code with the same sharding, so all three end bitwise equal, and equal to the
single-process run with the same global batch up to float rounding. The deepspeed run
compiles nothing: zo2 creates its gloo process group through torch.distributed, so
DeepSpeed's CPU communication extension is never built. The Ray job is submitted with
``ray job submit`` to a local cluster (``ray start --head --num-cpus=2``) whose files
all live in the test's temporary folders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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
    """The final weights: the checkpoint of the last step."""
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / "step-00000003" / "model.safetensors")


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
    if launcher == "ray":
        return _ray_job(args, cwd)
    raise ValueError(launcher)


@contextmanager
def ray_cluster(cwd: Path):
    """A local Ray cluster (``ray start --head``, 2 CPUs) whose files all live in a
    temporary folder; yields the environment and dashboard address for ``ray job``."""
    ray = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths have a limit
    env = dict(_env(), RAY_TMPDIR=str(temp), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dashboard = _free_port()
    start = [ray, "start", "--head", "--num-cpus=2", f"--temp-dir={temp}",
             f"--port={_free_port()}", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={_free_port()}", "--include-dashboard=true",
             "--disable-usage-stats"]
    try:
        up = subprocess.run(start, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def ray_submit(address: str, name: str, args: list[str], cwd: Path) -> list[str]:
    """The ``ray job submit`` command line of the zo2 Ray Train job (2 workers)."""
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={address}",
            "--", "python", "-m", "zo2.launch.ray_job", "--workers=2",
            f"--storage={cwd / 'ray-storage'}", f"--name={name}", "--", *args]


def _ray_job(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    with ray_cluster(cwd) as (env, address):
        proc = subprocess.run(ray_submit(address, "ddp", args, cwd), cwd=cwd,
                              capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folders by launcher name, each job launched once per module on first use."""
    root = tmp_path_factory.mktemp("launchers")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            proc = launch(name, root / name, root)
            if name in ("torchrun", "deepspeed"):
                assert proc.stdout.count("tuned test acc") == 1  # the main rank reports
            if name != "single":
                par = json.loads((root / name / "summary.json").read_text())["parallel"]
                assert par["world"] == 2 and par["local_world"] == 2
            done[name] = root / name
        return done[name]

    return get


needs_ray = pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None,
                               reason="ray is not installed (pip install '.[dist]')")
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


@needs_ray
def test_ray_job_matches_torchrun_bitwise(runs):
    torchrun, ray = runs("torchrun"), runs("ray")
    a, b = _steps(torchrun), _steps(ray)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["grads"] == y["grads"] and x["loss"] == y["loss"]
    wa, wb = _weights(torchrun), _weights(ray)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    # Ray holds the job's checkpoints too (a failure restart resumes from them).
    reported = sorted(p for p in (ray.parent / "ray-storage" / "ddp").glob("checkpoint_*")
                      if p.is_dir())
    assert reported and (reported[-1] / "MANIFEST.json").is_file()


@pytest.mark.slow  # adds the single-process reference: ~95 s with the test above on 2 cores
@needs_deepspeed
def test_both_launchers_match_the_single_process_run(runs):
    ref = _steps(runs("single"))
    for name in ("torchrun", "deepspeed", "ray"):
        ours = _steps(runs(name))
        assert len(ours) == len(ref) == 3
        for x, r in zip(ours, ref, strict=True):  # the global batch split over two ranks
            assert x["grads"] == pytest.approx(r["grads"], abs=2e-3)


@pytest.mark.slow  # ~2 min: a Ray cluster, a killed worker, a restarted worker group
@needs_ray
def test_ray_restarts_a_killed_worker_from_its_last_checkpoint(tmp_path):
    """Ray's FailureConfig restarts the worker group after a worker is killed; the new
    workers resume from the checkpoint reported to Ray (PertP: bitwise the single run)."""
    import psutil
    from safetensors.torch import load_file

    args = [*COMMON, "steps=8", "checkpoint.every=2", "logging=none", "parallel=pertp"]
    single = tmp_path / "single"
    _run([sys.executable, *ENTRY, *args, f"output_dir={single}"], tmp_path)
    out = tmp_path / "ray-out"
    with ray_cluster(tmp_path) as (env, address):
        proc = subprocess.Popen(ray_submit(address, "restart", [*args, f"output_dir={out}"],
                                           tmp_path), cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        storage = tmp_path / "ray-storage" / "restart"
        deadline = time.monotonic() + 300
        while not [p for p in storage.glob("checkpoint_*") if p.is_dir()]:
            assert proc.poll() is None and time.monotonic() < deadline, "no Ray checkpoint"
            time.sleep(0.1)
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None, output[-4000:]
    final = "checkpoints/step-00000008/model.safetensors"
    a, b = load_file(out / final), load_file(single / final)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
