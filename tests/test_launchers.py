"""The same 2-rank DDP job through torchrun, the deepspeed launcher and a Ray cluster job.

The launchers only start processes and set the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT; Ray also builds the gloo process group); the job itself is the same
code with the same sharding, so all three end bitwise equal, and equal to the
single-process run with the same global batch up to float rounding. The deepspeed run
compiles nothing: zo2 creates its gloo process group through torch.distributed, so
DeepSpeed's CPU communication extension is never built. The Ray job is submitted with
``ray job submit`` to a local cluster (``ray start --head --num-cpus=2``) whose files
all live in the test's temporary folders.

The dev extra installs deepspeed and ray: without them these tests fail (they do not
skip). A test ends only processes it started: the Ray cluster's processes are the ones
whose environment carries the cluster's own ``RAY_TMPDIR`` (never ``ray stop``, which
ends every Ray process of the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import port_clash, retry_on_port_clash  # noqa: E402

COMMON = ["model=tiny-llama", "steps=3", "eval_every=0", "log_every=1", "optim.lr=1e-2",
          "task.n_train=24", "task.n_dev=12", "task.n_test=12", "task.max_length=48",
          "optim.batch_size=4", "eval_batch_size=12", "progress=false"]
ENTRY = ["-m", "zo2.launch.train"]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or _env(),
                          timeout=600)
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
    if launcher != "emulated":
        args.append("parallel=ddp")
    if launcher == "torchrun":
        return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", *ENTRY, *args], cwd)
    if launcher == "deepspeed":  # == `deepspeed --num_gpus 2 --no_local_rank --module ...`
        def start(ports: list[int]):
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                 "--master_port", str(ports[0]), "--no_local_rank", "--module",
                 "zo2.launch.train", *args], cwd=cwd, capture_output=True, text=True,
                env=_env(), timeout=600)
            return proc, "" if proc.returncode == 0 else proc.stdout + proc.stderr

        proc = retry_on_port_clash(start)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        return proc
    if launcher == "emulated":  # one process summing the step losses as 2 DDP ranks do
        return _run([sys.executable, str(Path(__file__).parent / "train_with.py"), *args], cwd,
                    env=dict(_env(), ZO2_TEST_EMULATE_DP="2"))
    if launcher == "ray":
        return _ray_job(args, cwd)
    raise ValueError(launcher)


def ray_processes(temp: str) -> list:
    """The processes of the Ray cluster whose RAY_TMPDIR is ``temp`` (this test's)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_TMPDIR") == temp:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_ray_cluster(temp: str) -> None:
    """End this test's Ray cluster, by its processes' ids (SIGTERM, then SIGKILL)."""
    import psutil

    procs = ray_processes(temp)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


@contextmanager
def ray_cluster(cwd: Path):
    """A local Ray cluster (``ray start --head``, 2 CPUs) whose files all live in a
    temporary folder; yields the environment and dashboard address for ``ray job``."""
    ray = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths have a limit
    env = dict(_env(), RAY_TMPDIR=str(temp), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def start(ports: list[int]):
        dashboard, port, agent = ports
        up = subprocess.run([ray, "start", "--head", "--num-cpus=2", f"--temp-dir={temp}",
                             f"--port={port}", f"--dashboard-port={dashboard}",
                             f"--dashboard-agent-listen-port={agent}",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        if up.returncode != 0 and port_clash(up.stdout + up.stderr):
            stop_ray_cluster(str(temp))  # what it had started, before the next attempt
        return (up, dashboard), "" if up.returncode == 0 else up.stdout + up.stderr

    try:
        up, dashboard = retry_on_port_clash(start, ports=3)
        assert up.returncode == 0, up.stderr[-3000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        stop_ray_cluster(str(temp))
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
            if name not in ("single", "emulated"):
                par = json.loads((root / name / "summary.json").read_text())["parallel"]
                assert par["world"] == 2 and par["local_world"] == 2
            done[name] = root / name
        return done[name]

    return get


def test_the_launchers_are_installed():
    """The dev extra requires both (pyproject.toml): missing, the launcher tests fail."""
    ray = Path(sys.executable).parent / "ray"
    assert ray.is_file(), f"{ray} missing: the dev extra installs ray[default,train]"
    assert importlib.util.find_spec("deepspeed") is not None, (
        "deepspeed missing: the dev extra installs it")


def test_deepspeed_launcher_matches_torchrun_bitwise(runs):
    torchrun, ds = runs("torchrun"), runs("deepspeed")
    a, b = _steps(torchrun), _steps(ds)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):  # same code, same shards: bitwise
        assert x["grads"] == y["grads"] and x["loss"] == y["loss"]
    wa, wb = _weights(torchrun), _weights(ds)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


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
def test_both_launchers_match_the_single_process_run(runs):
    """The global batch split over two ranks: each launcher's run equals, bit for bit,
    the one process that sums the step losses as two data-parallel ranks do
    (``dist_job.EmulatedDP``: each half's float32 mean, the float64 mean of the two)."""
    ref = _steps(runs("emulated"))
    for name in ("torchrun", "deepspeed", "ray"):
        ours = _steps(runs(name))
        assert len(ours) == len(ref) == 3
        for x, r in zip(ours, ref, strict=True):
            assert x["grads"] == r["grads"] and x["loss"] == r["loss"]
    wa, wb = _weights(runs("torchrun")), _weights(runs("emulated"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


@pytest.mark.slow  # ~2 min: a Ray cluster, a killed worker, a restarted worker group
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
        # a hang guard, not a timing: the first checkpoint came after 300 s once, with
        # the machine's 2 cores shared by three other jobs
        deadline = time.monotonic() + 900
        while not [p for p in storage.glob("checkpoint_*") if p.is_dir()]:
            assert proc.poll() is None and time.monotonic() < deadline, "no Ray checkpoint"
            time.sleep(0.1)
        # this job's Ray Train workers, as Ray lists them, and of this test's cluster only
        listed = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "actors",
                                 f"--address={address}", "--filter", "class_name=RayTrainWorker",
                                 "--filter", "state=ALIVE", "--format=json"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert listed.returncode == 0, listed.stderr[-3000:]
        pids = sorted(int(a["pid"]) for a in json.loads(listed.stdout))
        ours = {p.pid for p in ray_processes(env["RAY_TMPDIR"])}
        assert len(pids) == 2 and set(pids) <= ours, (pids, sorted(ours))
        psutil.Process(pids[-1]).kill()
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None, output[-4000:]
    final = "checkpoints/step-00000008/model.safetensors"
    a, b = load_file(out / final), load_file(single / final)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
