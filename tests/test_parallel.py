"""DistZO2 on CPU with several gloo processes: parallel == single process.

Each launch runs several scenarios of ``tests/dist_job.py`` on the same processes
(torchrun start-up costs seconds); the single-process reference runs in this process.

Tolerances. PertP and slicing change nothing in any rank's arithmetic, so they must
match the single process exactly. Data parallelism computes each shard's mean loss in
float32 and combines the shards in float64, while the single process takes one
float32 mean over the whole batch: the losses differ by a few float32 ulps (rel.
1e-6), and the projected gradient ``(L+ - L-) / (2 eps)`` turns an absolute loss
difference d into a gradient difference of up to d / eps: about 1e-3 here. The
weights then differ by ``lr * dg * |z|`` per step: well below 1e-5 after 10 steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_job  # noqa: E402

from zo2.parallel import LocalComm  # noqa: E402

TWO = [
    {"name": "pertp-llama", "pp": 2},
    {"name": "pertp-opt", "pp": 2, "family": "opt"},
    {"name": "ddp2", "dp": 2},
    {"name": "slice-pertp", "pp": 2, "offload": {"enabled": True, "ring": 2}, "slicing": "on"},
    {"name": "slice-ddp", "dp": 2, "offload": {"enabled": True, "ring": 1,
                                               "host_dtype": "float32", "wire_dtype": "bfloat16"},
     "slicing": "on"},
    # stateful rules shard their moments with the slices; resumed from a checkpoint
    {"name": "slice-adam", "pp": 2, "offload": {"enabled": True, "ring": 2}, "slicing": "on",
     "optim": {"method": "zo-adam", "state_dtype": "bfloat16"}, "resume_at": 4},
    {"name": "slice-momentum", "dp": 2, "offload": {"enabled": True, "ring": 1},
     "slicing": "on", "optim": {"method": "zo-momentum"}},
]
FOUR = [
    {"name": "ddp4", "dp": 4},
    {"name": "2d", "dp": 2, "pp": 2},
    {"name": "pertp4-q2", "pp": 4, "q": 2},
]


def torchrun(n: int, out: Path, specs: list[dict], timeout: float = 600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", str(HERE / "dist_job.py"), str(out),
           *[json.dumps(s) for s in specs]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    for n, specs in ((2, TWO), (4, FOUR)):
        proc = torchrun(n, out, specs)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def result(out: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / f"{name}.json").read_text()), load_file(out / f"{name}.safetensors")


def single(tmp_path: Path, **spec) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same scenario in this process, one rank, no mesh."""
    spec = {"name": "single", **spec}
    for key in ("dp", "pp", "slicing"):
        spec.pop(key, None)
    dist_job.run(tmp_path, spec)
    return result(tmp_path, "single")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,family", [("pertp-llama", "llama"), ("pertp-opt", "opt")])
def test_pertp2_equals_single_process_exactly(runs, tmp_path, name, family):
    ref, ref_w = single(tmp_path, family=family)
    got, got_w = result(runs, name)
    assert got["losses"] == ref["losses"] and got["grads"] == ref["grads"]
    assert got["eval"] == ref["eval"]
    assert_same_weights(got_w, ref_w)


def test_pertp4_with_two_directions_equals_single_process_exactly(runs, tmp_path):
    ref, ref_w = single(tmp_path, q=2)
    got, got_w = result(runs, "pertp4-q2")
    assert got["grads"] == ref["grads"]
    assert_same_weights(got_w, ref_w)


@pytest.mark.parametrize("name", ["ddp2", "ddp4", "2d"])
def test_data_parallel_matches_single_process_up_to_rounding(runs, tmp_path, name):
    ref, ref_w = single(tmp_path)
    got, got_w = result(runs, name)
    for a, b in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(got["grads"], ref["grads"]):
        assert a == pytest.approx(b, abs=2e-3)
    assert max(float((got_w[k] - ref_w[k]).abs().max()) for k in ref_w) < 1e-5
    assert got["eval"]["accuracy"] == ref["eval"]["accuracy"]
    assert got["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-5)


def test_data_parallel_sends_a_few_dozen_bytes_per_step(runs):
    got, _ = result(runs, "ddp2")
    assert got["bytes"][0] == 32  # (loss, count) for +eps and -eps, float64
    assert max(got["bytes"]) == 48  # plus a 16-byte checksum every check_every steps


def test_slicing_with_offload_equals_the_resident_single_process(runs, tmp_path):
    ref, ref_w = single(tmp_path)
    got, got_w = result(runs, "slice-pertp")
    assert got["losses"] == ref["losses"]
    assert_same_weights(got_w, ref_w)
    # Each rank uploads and writes back half of every block and receives the other half
    # from its peer: the scheduler's counters against the communication model.
    whole = single(tmp_path, offload={"enabled": True, "ring": 2})[0]["telemetry"][-1]
    steady = got["telemetry"][-1]
    assert steady["offload_uploads"] == whole["offload_uploads"] == 3
    assert steady["offload_up_mb"] == pytest.approx(whole["offload_up_mb"] / 2, rel=0.02)
    assert steady["offload_down_mb"] == pytest.approx(whole["offload_down_mb"] / 2, rel=0.02)
    assert steady["offload_gather_mb"] == pytest.approx(steady["offload_up_mb"], rel=1e-9)


def test_stateful_rules_with_slicing_shard_their_state_and_resume_exactly(runs, tmp_path):
    # PertP with slicing changes no arithmetic: ZO-Adam (bf16 moments) equals the
    # resident single process bit for bit, across a checkpoint written from the slices
    adam = {"method": "zo-adam", "state_dtype": "bfloat16"}
    ref, ref_w = single(tmp_path, optim=adam)
    got, got_w = result(runs, "slice-adam")
    assert got["losses"] == ref["losses"] and got["grads"] == ref["grads"]
    assert_same_weights(got_w, ref_w)
    saved = load_file(runs / "slice-adam-step4" / "zo2_rule_state.safetensors")
    engine, _ = dist_job.build({"optim": adam}, LocalComm())  # the same 4 steps, 1 process
    for t in range(4):
        engine.step(dist_job.batch({}, t))
    engine.flush()
    whole = engine.rule.state()
    assert saved.keys() == whole.keys() and all(torch.equal(saved[k], whole[k]) for k in whole)
    # rank 0 keeps the two moments of its half of each offloaded block (and the resident
    # units' whole): the state of the other half, one per moment, is not on rank 0
    assert got["offloaded_elements"] > 0
    assert ref["state_elements"] - got["state_elements"] == pytest.approx(
        got["offloaded_elements"], rel=0.05)
    # data parallel with momentum: as the plain data-parallel runs, up to rounding
    ref, ref_w = single(tmp_path, optim={"method": "zo-momentum"})
    got, got_w = result(runs, "slice-momentum")
    assert max(float((got_w[k] - ref_w[k]).abs().max()) for k in ref_w) < 1e-5


def test_slicing_with_a_compressed_wire_and_data_parallel(runs, tmp_path):
    ref, ref_w = single(tmp_path, offload={"enabled": True, "ring": 1,
                                           "host_dtype": "float32", "wire_dtype": "bfloat16"})
    got, got_w = result(runs, "slice-ddp")
    for a, b in zip(got["grads"], ref["grads"]):
        assert a == pytest.approx(b, abs=2e-3)
    assert max(float((got_w[k] - ref_w[k]).abs().max()) for k in ref_w) < 1e-5


def test_a_bad_mesh_is_one_clear_error_on_every_rank(tmp_path):
    proc = torchrun(2, tmp_path, [{"name": "bad", "dp": 3}], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: parallel: dp=3 x pp=1 = 3 processes") == 2


def test_ranks_that_drift_apart_stop_with_a_clear_error(tmp_path):
    proc = torchrun(2, tmp_path, [{"name": "drift", "dp": 2, "corrupt_at": 3}], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ranks diverged") == 2  # both ranks, after step 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    """Rank 1 dies mid-run (no launcher to clean up): rank 0 must fail on its own."""
    port = _free_port()
    spec = json.dumps({"name": "dies", "dp": 2, "die_at": 2, "timeout_s": 20})
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_job.py"), str(tmp_path),
                                       spec], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes[1] == 17 and codes[0] != 0
    assert time.monotonic() - start < 120


def test_two_nodes_slice_within_each_node(tmp_path):
    """Two torchrun agents on this machine as two nodes of two ranks: a 2 x 2 mesh whose
    slice groups are the node-local pairs (LOCAL_WORLD_SIZE), offloaded and sliced."""
    port = _free_port()
    spec = {"name": "nodes", "dp": 2, "pp": 2, "slicing": "on",
            "offload": {"enabled": True, "ring": 2}}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
         "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=zo2-test", str(HERE / "dist_job.py"), str(tmp_path), json.dumps(spec)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert all(a.returncode == 0 for a in agents), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    ref, ref_w = single(tmp_path, offload={"enabled": True, "ring": 2})
    got, got_w = result(tmp_path, "nodes")
    for a, b in zip(got["grads"], ref["grads"]):
        assert a == pytest.approx(b, abs=2e-3)
    assert max(float((got_w[k] - ref_w[k]).abs().max()) for k in ref_w) < 1e-5
    steady, whole = got["telemetry"][-1], ref["telemetry"][-1]
    assert steady["offload_up_mb"] == pytest.approx(whole["offload_up_mb"] / 2, rel=0.02)
