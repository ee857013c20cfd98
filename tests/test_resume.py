"""Kill a training run (SIGKILL) and start it again: it ends with exactly the weights of
an uninterrupted run. Single process, offloaded, and a 2-rank torchrun job restarted by
torchrun itself (``--max-restarts``), in the directory torchrun's run id names.

Perturbation parallelism and offloading are bit-identical to the single resident
process, so one uninterrupted reference serves every case.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

STEPS = 8
ARGS = ["model=tiny-llama", f"steps={STEPS}", "eval_every=3", "log_every=1", "optim.lr=1e-3",
        "checkpoint.every=2", "checkpoint.keep=2", "task.n_train=24", "task.n_dev=12",
        "task.n_test=12", "task.max_length=48", "optim.batch_size=4", "eval_batch_size=12",
        "progress=false", "logging=none"]
ENTRY = [sys.executable, "-m", "zo2.launch.train"]
# zo2-train with a kill point inside the run (tests/train_with.py): the process signals
# itself right after a given checkpoint is published or a given step is computed
KILLABLE = str(Path(__file__).resolve().parent / "train_with.py")


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def _run(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    if ok:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _wait_for_mark(mark: Path, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, float]:
    """The (pid, time) a kill point wrote just before its signal; fails if the run
    ends (or hangs) without reaching it."""
    deadline = time.monotonic() + timeout
    while not (mark.is_file() and mark.read_text().strip()):
        assert proc.poll() is None, "the run ended before the point where it was to be killed"
        assert time.monotonic() < deadline, f"no kill point reached in {timeout} s"
        time.sleep(0.05)
    pid, when = mark.read_text().split()
    return int(pid), float(when)


def _final(out: Path) -> dict:
    return load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def _events(out: Path) -> list[tuple[str, int]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r.get("step", -1)) for r in records if r["event"] in ("step", "eval")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    _run([*ENTRY, *ARGS, f"output_dir={out}"], out.parent)
    return out


@pytest.mark.parametrize("extra,kill,resumed_from", [
    ([], "checkpoint:4", 4),  # killed between steps, right after a checkpoint
    # offloaded, killed mid-run: step 5 computed, its update pending in memory only
    (["offload=cpu", "offload.ring=1"], "step:5", 4),
])
def test_killed_run_resumes_exactly(reference, tmp_path, extra, kill, resumed_from):
    out = tmp_path / "run"
    args = [*ARGS, *extra, f"output_dir={out}"]
    proc = subprocess.run([sys.executable, KILLABLE, *args], cwd=tmp_path,
                          env=_env(ZO2_TEST_KILL=kill), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert not (out / "summary.json").exists()
    # keep=2: the checkpoints before the kill point, the newest two of them
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"step-{s:08d}" for s in (resumed_from - 2, resumed_from)]
    done = _run([*ENTRY, *args], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None, done.stderr[-2000:]
    assert summary["resumed_from"].endswith(f"step-{resumed_from:08d}")
    _assert_same(_final(out), _final(reference))
    _assert_same(load_file(out / "best" / "model.safetensors"),
                 load_file(reference / "best" / "model.safetensors"))
    # The metrics read as one run: every step and evaluation once, in order.
    assert _events(out) == _events(reference)
    ref_summary = json.loads((reference / "summary.json").read_text())
    for key in ("zero_shot_test", "best_step", "best_dev", "tuned_test"):
        assert summary[key] == ref_summary[key], key
    # The seed log survives the kill too: the same file as the uninterrupted run's.
    assert (out / "run.seedlog").read_bytes() == (reference / "run.seedlog").read_bytes()


def test_the_seed_log_replays_onto_the_base_to_the_final_weights(reference):
    from zo2.models import load_model
    from zo2.seedlog import SeedLog, replay

    log = SeedLog.load(reference / "run.seedlog")
    assert len(log) == STEPS
    model, _ = load_model("tiny-llama")  # the same seeded random base
    replay(model, log)
    _assert_same({k: v.contiguous() for k, v in model.state_dict().items()
                  if k in _final(reference)}, _final(reference))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("summary.json",):
        (out / name).unlink()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000006", f"step-{STEPS:08d}"]
    weights = checkpoints[-1] / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(blob))
    done = _run([*ENTRY, *ARGS, f"output_dir={out}"], tmp_path)
    assert "fails its SHA-256 check" in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000006")
    _assert_same(_final(out), _final(reference))  # step 8 redone, and the same


def test_resume_refuses_a_changed_config_and_touches_nothing(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.jsonl").read_bytes()
    proc = _run([*ENTRY, *ARGS, "optim.lr=5e-4", f"output_dir={out}"], tmp_path, ok=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot resume") and "optim" in proc.stderr
    proc = _run([*ENTRY, *ARGS, "checkpoint.resume=never", f"output_dir={out}"], tmp_path,
                ok=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_torchrun_restarts_a_killed_worker_and_resumes(reference, tmp_path):
    """2 ranks of perturbation parallelism under ``torchrun --max-restarts=1``; one
    worker is killed; torchrun restarts both, they resume from the newest checkpoint in
    ``runs/torchrun-<run id>`` (no output_dir given) and end bitwise equal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "--monitor-interval=0.2", KILLABLE, *ARGS, "parallel=pertp"]
    # rank 1 kills itself right after checkpoint 4 is published (first attempt only)
    env = _env(ZO2_TEST_KILL="checkpoint:4", ZO2_TEST_KILL_RANK="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out,) = (tmp_path / "runs").glob("torchrun-*")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000004")
    _assert_same(_final(out), _final(reference))
    assert _events(out) == _events(reference)


def test_a_hung_rank_is_detected_within_the_timeout_and_the_job_resumes(reference, tmp_path):
    """One of two ranks stops (SIGSTOP: alive but silent). The other's next collective
    gives up after ``parallel.timeout_s`` with a clear message; torchrun restarts the
    job, which resumes from the newest checkpoint and ends bitwise equal."""
    import psutil

    timeout = 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "--monitor-interval=0.2", KILLABLE, *ARGS, "parallel=pertp",
           f"parallel.timeout_s={timeout}"]
    # rank 1 stops itself (SIGSTOP) right after checkpoint 4 is published
    mark = tmp_path / "stopped"
    env = _env(ZO2_TEST_KILL="checkpoint:4", ZO2_TEST_KILL_RANK="1",
               ZO2_TEST_KILL_SIGNAL="STOP", ZO2_TEST_KILL_MARK=str(mark))
    log = (tmp_path / "torchrun.log").open("w+")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    try:
        pid, stopped_at = _wait_for_mark(mark, proc)
        hung = psutil.Process(pid)
        assert hung.pid in [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        other = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.pid != pid and "train_with.py" in " ".join(p.cmdline())]
        assert len(other) == 1, other
        other[0].wait(timeout=timeout + 60)  # it gives up on its own
        detected = time.time() - stopped_at
        hung.resume()  # lets torchrun's SIGTERM end it now rather than after its grace period
        proc.wait(timeout=600)
    finally:
        proc.kill()  # ours; a no-op once it has ended
        proc.wait()
    log.seek(0)
    output = log.read()
    assert proc.returncode == 0, output[-4000:]
    (out,) = (tmp_path / "runs").glob("torchrun-*")
    # the other rank's next collective waits timeout_s, then fails; the slack covers its
    # error path and exit (and the polling here), not a second timeout
    assert timeout <= detected + 1 and detected < 2 * timeout, detected
    assert "another rank died or hung longer than parallel.timeout_s=10 s" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    _assert_same(_final(out), _final(reference))
