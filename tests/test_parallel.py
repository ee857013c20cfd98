"""DistZO2 on CPU with several gloo processes: parallel == single process.

Each launch runs several scenarios of ``tests/dist_job.py`` on the same processes
(torchrun start-up costs seconds); the single-process reference runs in this process.

Exact comparisons, no tolerances. PertP and slicing change nothing in any rank's
arithmetic, so they equal the single process bit for bit. Data parallelism computes
each shard's float32 mean loss and combines the shards in float64; one process taking
one float32 mean over the whole batch rounds differently (at most ``gamma_{n-1} +
gamma_{n/dp-1}`` relative, see ``mean_rounding``), and ``g = (L+ - L-) / (2 eps)``
turns that into a gradient difference of up to ``~10 u L / eps`` (4e-4 here), whose
updates then steer the two runs apart step by step. With a bf16 wire nothing bounds
that drift: a master difference d flips the bf16 rounding of the elements within d of
a rounding boundary, each flip moves a weight by a whole bf16 ulp (2^-8..2^-7 of it,
far more than d), and the loss change it causes, divided by eps, is the next
gradient's difference. So each data-parallel run is compared exactly with one process
that computes the same sums (``dist_job.EmulatedDP``: each shard's float32 mean, the
float64 combination, which is exact in any order), and with the plain single process
only at the first step, from the same weights, within the derived rounding bound.
Nothing here depends on the CPU's SIMD width: the emulation reproduces the ranks'
sums, whatever order the kernels add in (the bound covers any order).
"""

from __future__ import annotations

import json
import os
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
from _procs import retry_on_port_clash  # noqa: E402
from conftest import make_batch, make_model  # noqa: E402

from zo2.offload.store import ALIGN  # noqa: E402
from zo2.parallel import Mesh  # noqa: E402

U32 = 2.0**-24  # float32 unit roundoff
EPS = 1e-3  # dist_job's optim.eps (OptimConfig's default)

HIZOO = {"estimator": "hizoo", "hessian": "diagonal", "hessian_smooth": 0.1}
TWO = [
    {"name": "pertp-llama", "pertp": 2},
    {"name": "pertp-opt", "pertp": 2, "family": "opt"},
    {"name": "ddp2", "dp": 2},
    {"name": "slice-pertp", "pertp": 2, "offload": {"enabled": True, "ring": 2}, "slicing": "on"},
    {"name": "slice-ddp", "dp": 2, "offload": {"enabled": True, "ring": 1,
                                               "host_dtype": "float32", "wire_dtype": "bfloat16"},
     "slicing": "on"},
    # the same data parallel run with the same bf16 wire, unsliced
    {"name": "ddp-bf16", "dp": 2, "offload": {"enabled": True, "ring": 1,
                                              "host_dtype": "float32", "wire_dtype": "bfloat16"}},
    # stateful rules shard their moments with the slices; resumed from a checkpoint
    {"name": "slice-adam", "pertp": 2, "offload": {"enabled": True, "ring": 2}, "slicing": "on",
     "optim": {"method": "zo-adam", "state_dtype": "bfloat16"}, "resume_at": 4},
    {"name": "slice-momentum", "dp": 2, "offload": {"enabled": True, "ring": 1},
     "slicing": "on", "optim": {"method": "zo-momentum"}},
    # FZOO: the baseline and 3 one-sided perturbations, two slices a rank; resumed midway
    {"name": "pertp-fzoo", "pertp": 2, "q": 3, "resume_at": 4,
     "optim": {"estimator": "fzoo", "direction": "rademacher", "lr": 1e-4}},
    # sparse and low-rank directions on sliced blocks: each rank forms z and the mask for
    # its half of every block only; the sparse thresholds resumed from a checkpoint
    {"name": "slice-sparse", "pertp": 2, "offload": {"enabled": True, "ring": 2},
     "slicing": "on", "optim": {"sparsity": 0.5}, "resume_at": 4},
    {"name": "slice-lowrank", "dp": 2, "offload": {"enabled": True, "ring": 1},
     "slicing": "on", "optim": {"method": "zo-momentum", "rank": 2}},
    # HiZOO: 3 slices (baseline, +eps, -eps) over 2 ranks, its curvature resumed; and
    # HiZOO-L on sliced blocks, each rank advancing the whole factors
    {"name": "pertp-hizoo", "pertp": 2, "resume_at": 4, "optim": HIZOO},
    {"name": "slice-hizoo-light", "dp": 2, "offload": {"enabled": True, "ring": 1},
     "slicing": "on", "optim": {**HIZOO, "hessian": "factored"}},
    # a 4-bit model: each rank uploads its slice of the float lane and the codes whole
    {"name": "slice-q4", "pertp": 2, "offload": {"enabled": True, "ring": 2},
     "slicing": "on", "quantization": "nf4", "resume_at": 4},
    # in bf16: blocks held widened (fp32 scales beside bf16 norms), each rank's slice
    # of the float32 lane, the norms' updates rounded to bf16
    {"name": "slice-q4-bf16", "dp": 2, "offload": {"enabled": True, "ring": 1},
     "slicing": "on", "quantization": "nf4", "dtype": "bfloat16", "resume_at": 4},
]
FOUR = [
    {"name": "ddp4", "dp": 4},
    {"name": "2d", "dp": 2, "pertp": 2},
    {"name": "pertp4-q2", "pertp": 4, "q": 2},
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
    """The same scenario in this process, one rank, no mesh; ``dp`` > 1: computing the
    step losses as that many data-parallel ranks do (``dist_job.EmulatedDP``)."""
    spec = {"name": "single", **spec}
    dp = spec.pop("dp", 1)
    for key in ("pertp", "slicing"):
        spec.pop(key, None)
    if dp > 1:
        spec["emulate_dp"] = dp
    dist_job.run(tmp_path, spec)
    return result(tmp_path, "single")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(got: tuple[dict, dict], ref: tuple[dict, dict]) -> None:
    """Losses, projected gradients, evaluation and final weights, bit for bit."""
    (g, gw), (r, rw) = got, ref
    assert g["losses"] == r["losses"] and g["grads"] == r["grads"]
    assert g["eval"] == r["eval"]
    assert_same_weights(gw, rw)


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a float32 sum of
    k + 1 non-negative terms added in any order (so whatever the SIMD width)."""
    return k * U32 / (1 - k * U32)


def mean_rounding(loss: float, rows: int, dp: int) -> float:
    """A bound on |one process's loss - the data-parallel loss| from the same weights.

    One process: the float32 mean of ``rows`` non-negative per-row losses (cross-entropy
    sums them, then divides by the count: a power of two here, exact), relative error
    <= gamma(rows - 1) of the exact mean L. Data parallel: each rank's float32 mean of
    rows/dp losses, <= gamma(rows/dp - 1) of its exact mean, then the float64 mean of
    the ranks' means, exact (``dist_job.EmulatedDP``). The per-row losses are equal in
    both (the forward is row-independent: ``test_the_forward_is_row_independent``).
    So |difference| <= (gamma(rows-1) + gamma(rows/dp-1)) L, and L <= loss (1 + gamma)
    from either computed value; one more float32 ulp for the float() of the result.
    """
    bound = gamma(rows - 1) + gamma(rows // dp - 1)
    return (bound * (1 + bound) + 2 * U32) * abs(loss)


def assert_first_step_within_rounding(got: dict, plain: dict, rows: int, dp: int) -> None:
    """Step 0 starts from the same weights in both runs (and the same bf16 wire values):
    the losses differ by the mean's rounding, the gradients by that over 2 eps."""
    gl, pl = got["losses"][0], plain["losses"][0]
    bounds = [mean_rounding(max(a, b), rows, dp) for a, b in zip(gl, pl, strict=True)]
    assert all(abs(a - b) <= d for a, b, d in zip(gl, pl, bounds)), (gl, pl, bounds)
    # g = (L+ - L-) / (2 eps), in float64 (its own rounding: a few 2^-53 of |g|)
    dg = (bounds[0] + bounds[1]) / (2 * EPS)
    for a, b in zip(got["grads"][0], plain["grads"][0], strict=True):
        assert abs(a - b) <= dg + 2**-50 * abs(b), (a, b, dg)


def test_the_forward_is_row_independent():
    """The premise of the exact data-parallel comparisons: a row's logits do not depend
    on the other rows in its batch, so a rank's shard gives the rows the whole batch
    gives them (both families of the runs, every shard size they use)."""
    for family in ("llama", "opt"):
        model = make_model(family, layers=3)
        batch = make_batch(batch=8, seed=0)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            whole = model(input_ids=ids, attention_mask=mask).logits
            for size in (4, 2):
                parts = [model(input_ids=ids[i:i + size], attention_mask=mask[i:i + size]).logits
                         for i in range(0, 8, size)]
                assert torch.equal(torch.cat(parts), whole), (family, size)


@pytest.mark.parametrize("name,family", [("pertp-llama", "llama"), ("pertp-opt", "opt")])
def test_pertp2_equals_single_process_exactly(runs, tmp_path, name, family):
    ref, ref_w = single(tmp_path, family=family)
    got, got_w = result(runs, name)
    assert got["losses"] == ref["losses"] and got["grads"] == ref["grads"]
    assert got["eval"] == ref["eval"]
    assert_same_weights(got_w, ref_w)


def test_fzoo_perturbation_parallel_and_resumed_equals_single_process_exactly(runs, tmp_path):
    ref = single(tmp_path, q=3, optim={"estimator": "fzoo", "direction": "rademacher",
                                       "lr": 1e-4})
    assert_same_run(result(runs, "pertp-fzoo"), ref)


def test_sparse_and_low_rank_directions_sliced_equal_single_process_exactly(runs, tmp_path):
    sparse = {"optim": {"sparsity": 0.5}}
    assert_same_run(result(runs, "slice-sparse"), single(tmp_path, **sparse))
    lowrank = {"optim": {"method": "zo-momentum", "rank": 2},
               "offload": {"enabled": True, "ring": 1}}
    assert_same_run(result(runs, "slice-lowrank"), single(tmp_path, dp=2, **lowrank))


def test_hizoo_perturbation_and_data_parallel_equal_single_process_exactly(runs, tmp_path):
    assert_same_run(result(runs, "pertp-hizoo"), single(tmp_path, optim=HIZOO))
    light = {"optim": {**HIZOO, "hessian": "factored"},
             "offload": {"enabled": True, "ring": 1}}
    assert_same_run(result(runs, "slice-hizoo-light"), single(tmp_path, dp=2, **light))


def test_a_quantized_model_sliced_and_resumed_equals_single_process_exactly(runs, tmp_path):
    pytest.importorskip("bitsandbytes")
    assert_same_run(result(runs, "slice-q4"), single(tmp_path, quantization="nf4"))
    resident = single(tmp_path, dp=2, quantization="nf4", dtype="bfloat16")
    assert_same_run(result(runs, "slice-q4-bf16"), resident)


def test_pertp4_with_two_directions_equals_single_process_exactly(runs, tmp_path):
    ref, ref_w = single(tmp_path, q=2)
    got, got_w = result(runs, "pertp4-q2")
    assert got["grads"] == ref["grads"]
    assert_same_weights(got_w, ref_w)


@pytest.mark.parametrize("name,dp", [("ddp2", 2), ("ddp4", 4), ("2d", 2)])
def test_data_parallel_equals_the_single_process_summing_the_same_way(runs, tmp_path,
                                                                       name, dp):
    got = result(runs, name)
    assert_same_run(got, single(tmp_path, dp=dp))
    plain, _ = single(tmp_path)
    assert_first_step_within_rounding(got[0], plain, rows=8, dp=dp)


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
    # A sliced block's flat buffer is padded to a multiple of 2 x ALIGN elements and
    # cut in two equal halves (offload/store.py Block.shard); the unsliced one is a
    # multiple of ALIGN already: each half is half the block plus at most ALIGN/2 float32
    # elements of padding, per block moved.
    pad = steady["offload_uploads"] * (ALIGN // 2) * 4 / 2**20
    assert 0 <= steady["offload_up_mb"] - whole["offload_up_mb"] / 2 <= pad
    assert 0 <= steady["offload_down_mb"] - whole["offload_down_mb"] / 2 <= pad
    assert steady["offload_gather_mb"] == steady["offload_up_mb"]  # the peer's equal half


def test_stateful_rules_with_slicing_shard_their_state_and_resume_exactly(runs, tmp_path):
    # PertP with slicing changes no arithmetic: ZO-Adam (bf16 moments) equals the
    # resident single process bit for bit, across a checkpoint written from the slices
    adam = {"method": "zo-adam", "state_dtype": "bfloat16"}
    ref, ref_w = single(tmp_path, optim=adam)
    got, got_w = result(runs, "slice-adam")
    assert got["losses"] == ref["losses"] and got["grads"] == ref["grads"]
    assert_same_weights(got_w, ref_w)
    saved = load_file(runs / "slice-adam-step4" / "zo2_rule_state.safetensors")
    engine, _ = dist_job.build({"optim": adam}, Mesh.local())  # the same 4 steps, 1 process
    for t in range(4):
        engine.step(dist_job.batch({}, t))
    engine.flush()
    whole = engine.rule.state()
    assert saved.keys() == whole.keys() and all(torch.equal(saved[k], whole[k]) for k in whole)
    # rank 0 keeps the two moments of its half of each offloaded block (and the resident
    # units' whole): the state of the other half, one per moment, is not on rank 0
    assert got["offloaded_elements"] > 0
    # The other half's two moments: 2 E1 of the E offloaded (all trainable) elements,
    # E0 + E1 = E. Each half of a block is `chunk` flat slots, elements plus alignment
    # gaps and padding, so |E1 - E0| <= the slots that hold no element:
    # |2 E1 - E| = |E1 - E0| <= slots - E.
    missing = ref["state_elements"] - got["state_elements"]
    gaps = got["offloaded_slots"] - got["offloaded_elements"]
    assert abs(missing - got["offloaded_elements"]) <= gaps
    # data parallel with momentum, sliced: exactly the process summing the same way
    momentum = {"optim": {"method": "zo-momentum"}, "offload": {"enabled": True, "ring": 1}}
    got = result(runs, "slice-momentum")
    assert_same_run(got, single(tmp_path, dp=2, **momentum))
    assert_first_step_within_rounding(got[0], single(tmp_path, **momentum)[0], rows=8, dp=2)


def test_slicing_with_a_compressed_wire_and_data_parallel(runs, tmp_path):
    """Slicing with a bf16 wire changes nothing: the sliced run equals the unsliced
    data-parallel run with the same wire, and both the one process summing the same
    way; the plain one process only at the first step (see the module docstring)."""
    wire = {"enabled": True, "ring": 1, "host_dtype": "float32", "wire_dtype": "bfloat16"}
    got = result(runs, "slice-ddp")
    assert_same_run(got, result(runs, "ddp-bf16"))
    assert_same_run(got, single(tmp_path, dp=2, offload=wire))
    assert_first_step_within_rounding(got[0], single(tmp_path, offload=wire)[0], rows=8, dp=2)


def test_a_bad_mesh_is_one_clear_error_on_every_rank(tmp_path):
    proc = torchrun(2, tmp_path, [{"name": "bad", "dp": 3}], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: parallel: dp=3 x pertp=1 = 3 processes") == 2


def test_ranks_that_drift_apart_stop_with_a_clear_error(tmp_path):
    proc = torchrun(2, tmp_path, [{"name": "drift", "dp": 2, "corrupt_at": 3}], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ranks diverged") == 2  # both ranks, after step 4


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    """Rank 1 dies mid-run (no launcher to clean up): rank 0 must fail on its own, with
    the DistributedError message, from the closed connection, not after the timeout."""
    timeout_s = 30
    spec = json.dumps({"name": "dies", "dp": 2, "die_at": 2, "timeout_s": timeout_s})

    def launch(ports: list[int]):
        procs, logs = [], [tmp_path / f"rank{rank}.err" for rank in range(2)]
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
                       OMP_NUM_THREADS="1")
            with logs[rank].open("w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, str(HERE / "dist_job.py"), str(tmp_path), spec], env=env,
                    stdout=subprocess.DEVNULL, stderr=err))
        # start-up (torch, the model) has no timeout of its own: a generous limit for it
        deadline, died, ended = time.monotonic() + 300 + timeout_s, None, None
        try:
            while ended is None and time.monotonic() < deadline:
                if died is None and procs[1].poll() is not None:
                    died = time.monotonic()
                if procs[0].poll() is not None:
                    ended = time.monotonic()
                time.sleep(0.05)
        finally:
            for p in procs:  # only ours, by their ids; a no-op once they have ended
                p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        rank0 = logs[0].read_text()
        detected = None if died is None or ended is None else ended - died
        done = (codes, rank0, detected)
        return done, "" if codes == [2, 17] else rank0 + logs[1].read_text()

    (codes, rank0, detected) = retry_on_port_clash(launch)
    assert codes == [2, 17], rank0[-3000:]  # rank 0: a ZO2Error (exit 2); rank 1: os._exit(17)
    assert ("error: rank 0: " in rank0 and " failed: another rank died or hung longer than "
            f"parallel.timeout_s={timeout_s} s" in rank0), rank0[-3000:]
    # A dead peer closes its connections: rank 0's collective fails at once. Waiting
    # for the timeout instead would take timeout_s at least.
    assert detected is not None and detected < timeout_s, detected


def test_two_nodes_slice_within_each_node(tmp_path):
    """Two torchrun agents on this machine as two nodes of two ranks: a 2 x 2 mesh whose
    slice groups are the node-local pairs (LOCAL_WORLD_SIZE), offloaded and sliced."""
    spec = {"name": "nodes", "dp": 2, "pertp": 2, "slicing": "on",
            "offload": {"enabled": True, "ring": 2}}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def launch(ports: list[int]):
        agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{ports[0]}",
             "--rdzv-id=zo2-test", str(HERE / "dist_job.py"), str(tmp_path), json.dumps(spec)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in (0, 1)]
        try:
            outputs = [agents[0].communicate(timeout=300)]
            if agents[0].returncode != 0:  # node 1 would wait for its rendezvous in vain
                agents[1].kill()
            outputs.append(agents[1].communicate(timeout=300))
        finally:
            for a in agents:  # only ours, by their ids; a no-op once they have ended
                a.kill()
                a.wait()
        ok = all(a.returncode == 0 for a in agents)
        text = outputs[0][1][-3000:] + outputs[1][1][-3000:]
        return (ok, text), "" if ok else text

    ok, text = retry_on_port_clash(launch)
    assert ok, text
    # slicing and the second node change no arithmetic: exactly the process summing as
    # the two data-parallel ranks of the 2 x 2 mesh do
    got = result(tmp_path, "nodes")
    offload = {"enabled": True, "ring": 2}
    assert_same_run(got, single(tmp_path, dp=2, offload=offload))
    assert_first_step_within_rounding(got[0], single(tmp_path, offload=offload)[0], rows=8,
                                      dp=2)
    ref, _ = single(tmp_path, offload=offload)
    steady, whole = got[0]["telemetry"][-1], ref["telemetry"][-1]
    pad = steady["offload_uploads"] * (ALIGN // 2) * 4 / 2**20  # as in the test above
    assert 0 <= steady["offload_up_mb"] - whole["offload_up_mb"] / 2 <= pad


def test_a_parallel_preset_run_as_one_process_says_which_launcher_to_use(caplog):
    from zo2.config import ParallelConfig
    from zo2.parallel import LaunchEnv, Mesh

    with caplog.at_level("WARNING", logger="zo2"):
        Mesh(ParallelConfig(), torch.device("cpu"), LaunchEnv())  # single: nothing to say
        assert not caplog.records
        mesh = Mesh(ParallelConfig(dp=-1), torch.device("cpu"), LaunchEnv())
    assert (mesh.dp, mesh.pertp, mesh.distributed) == (1, 1, False)
    (record,) = caplog.records
    assert "started as one process" in record.message
    assert "torchrun --nproc_per_node=N" in record.message
