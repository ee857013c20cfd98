"""The engine on a CUDA device (skipped without one; CI has none).

Runs under pytest, or without it on a GPU machine that has none:
``python -m bench.gpu_tests`` (what ``bench/gpu_check.sh`` does).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_batch, make_model

from zo2 import Objective, OptimConfig, ZOEngine
from zo2.config import OffloadConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# CPU runs and host-side updates (stateful rules offloaded) use the numba kernels
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="needs numba (the CPU kernels)")


def _engine(model, **optim):
    return ZOEngine(model, OptimConfig(**optim), Objective("label_words", torch.tensor([5, 9])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_steps_at_lr_zero_leave_weights_bit_identical(dtype):
    model = make_model("llama", dtype=dtype).cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = _engine(model, lr=0.0)
    for i in range(20):
        engine.step(make_batch(seed=i))
    engine.flush()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@needs_numba
def test_cuda_updates_follow_the_cpu_run_closely():
    """Same seeds on CPU and GPU: the same z (Philox), so nearly the same weights."""
    runs = []
    for device in ("cpu", "cuda"):
        model = make_model("qwen2").to(device)
        engine = _engine(model, lr=1e-2, direction="rademacher")
        for i in range(5):
            engine.step(make_batch(seed=i))
        engine.flush()
        runs.append({k: v.cpu() for k, v in model.state_dict().items()})
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ring", [1, 2, 3])
def test_cuda_offloaded_equals_resident(dtype, ring):
    runs = []
    for offload in (None, OffloadConfig(enabled=True, ring=ring)):
        model = make_model("llama", layers=4, dtype=dtype)
        engine = ZOEngine(model, OptimConfig(lr=1e-2), Objective("label_words",
                          torch.tensor([5, 9])), offload=offload, device="cuda")
        losses = [engine.step(make_batch(seed=i)).losses for i in range(10)]
        weights = {k: v.detach().cpu().clone() for k, v in engine.export_state_dict().items()}
        runs.append((losses, weights))
    (la, wa), (lb, wb) = runs
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cuda_offload_uses_pinned_host_memory_and_streams():
    model = make_model("mistral", layers=4)
    engine = ZOEngine(model, OptimConfig(lr=1e-3), Objective("label_words", torch.tensor([5, 9])),
                      offload=OffloadConfig(enabled=True, ring=2), device="cuda")
    assert all(b.host.is_pinned() for b in engine.residency.blocks)
    for i in range(3):
        telemetry = engine.step(make_batch(seed=i)).telemetry
    assert telemetry["offload_uploads"] == 4 and telemetry["gpu_allocated_gb"] > 0


@needs_numba
@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_zo_adam_resumes_exactly(offloaded, tmp_path):
    """The moments saved from (and loaded back to) a CUDA run: resumed == uninterrupted."""
    def engine():
        offload = OffloadConfig(enabled=True, ring=2) if offloaded else None
        return ZOEngine(make_model("llama", layers=3), OptimConfig(method="zo-adam", lr=1e-3),
                        Objective("label_words", torch.tensor([5, 9])), seed=1,
                        total_steps=6, offload=offload, device="cuda")

    full, first = engine(), engine()
    for i in range(6):
        full.step(make_batch(seed=i))
    for i in range(3):
        first.step(make_batch(seed=i))
    first.save(tmp_path / "ck")
    resumed = engine()
    resumed.load(tmp_path / "ck")
    for i in range(3, 6):
        resumed.step(make_batch(seed=i))
    wa, wb = full.export_state_dict(), resumed.export_state_dict()
    assert all(torch.equal(wa[k].cpu(), wb[k].cpu()) for k in wa)


def _no_sync(fn):
    """``fn`` run under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises."""
    def guarded(*args, **kwargs):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return guarded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_steps_make_no_host_sync(offloaded, dtype):
    """After warm-up, zo2's part of a step (every unit's upload, update, perturbation,
    forward and write-back, and the flush) runs without a host sync.

    The model's own code around the units (the mask built from the attention mask, which
    transformers checks with ``.all()``) and the losses' read-back sync by design and are
    outside the check; the unit wrapper calls ``context.run_unit`` for every unit, and the
    engine brackets the forward with ``begin_pass`` / ``end_pass`` and ``flush``.
    """
    offload = OffloadConfig(enabled=True, ring=2) if offloaded else None
    engine = ZOEngine(make_model("llama", layers=4, dtype=dtype), OptimConfig(lr=1e-3),
                      Objective("label_words", torch.tensor([5, 9])), offload=offload,
                      device="cuda")
    for i in range(2):  # warm-up: kernels compiled, tables and scratch allocated
        engine.step(make_batch(seed=i))
    with pytest.raises(RuntimeError):  # the check works: a pageable copy syncs
        _no_sync(torch.tensor)([1.0], device="cuda")
    engine.context.run_unit = _no_sync(engine.context.run_unit)
    for name in ("begin_pass", "end_pass", "flush"):
        setattr(engine.residency, name, _no_sync(getattr(engine.residency, name)))
    for i in range(2, 5):
        assert not engine.step(make_batch(seed=i), telemetry=False).skipped


def _assert_offloaded_equals_resident(optim: OptimConfig, steps: int) -> None:
    """A bf16 llama on CUDA, resident and offloaded (ring 2): the same losses at every
    step and the same weights after ``steps``, bit for bit."""
    runs = []
    for offload in (None, OffloadConfig(enabled=True, ring=2)):
        model = make_model("llama", layers=4, hidden=256, vocab=4096, dtype=torch.bfloat16)
        engine = ZOEngine(model, optim, Objective("label_words", torch.tensor([5, 9])),
                          offload=offload, device="cuda")
        losses = [engine.step(make_batch(seed=i, vocab=4096)).losses for i in range(steps)]
        runs.append((losses, {k: v.cpu() for k, v in engine.export_state_dict().items()}))
    (la, wa), (lb, wb) = runs
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", ["zo-sign", "zo-sgd"])
def test_cuda_zo_sign_offloaded_equals_resident(method):
    """Offloaded blocks are updated on the upload stream, the resident embeddings and head
    on the compute stream, at the same time: a scratch buffer shared by the two streams
    would mix their values. Per-stream scratch: offloaded == resident, bit for bit."""
    _assert_offloaded_equals_resident(OptimConfig(method=method, lr=1e-3), steps=8)


@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_peak_memory_covers_the_steps_since_the_last_collection(offloaded):
    """A long batch first, then short ones: the next collected step reports the long
    batch's peak, not its own (the peak counter is reset on collection only)."""
    offload = OffloadConfig(enabled=True, ring=2) if offloaded else None
    engine = ZOEngine(make_model("llama", layers=3, hidden=128), OptimConfig(lr=1e-3),
                      Objective("label_words", torch.tensor([5, 9])), offload=offload,
                      device="cuda")
    engine.step(make_batch(seed=0))  # warm-up
    engine.telemetry()  # resets the peak
    engine.step(make_batch(batch=16, seq=120, seed=1), telemetry=False)
    big = torch.cuda.max_memory_allocated() / 2**30
    for i in range(2):
        engine.step(make_batch(seed=2 + i), telemetry=False)
    reported = engine.step(make_batch(seed=5)).telemetry["gpu_peak_allocated_gb"]
    assert reported == big  # the same counter, read once, not reset in between
    after = engine.step(make_batch(seed=6)).telemetry["gpu_peak_allocated_gb"]
    assert after < big  # reset by the collection: the short step's own peak


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_engine_on_the_second_gpu_equals_the_first(offloaded):
    """Kernels launch on their tensors' device: a run on cuda:1 while cuda:0 is current."""
    runs = []
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        offload = OffloadConfig(enabled=True, ring=2) if offloaded else None
        engine = ZOEngine(make_model("llama", layers=3), OptimConfig(lr=1e-2),
                          Objective("label_words", torch.tensor([5, 9])), offload=offload,
                          device=device)
        torch.cuda.set_device(0)  # the engine made its device current; undo it
        for i in range(3):
            engine.step(make_batch(seed=i))
        runs.append({k: v.cpu() for k, v in engine.export_state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_one_launch_per_block_equals_a_launch_per_parameter(dtype):
    from zo2 import noise

    segments = [(0, 5, 11, 0, True), (64, 100_003, 2**64 - 7, 6, False),
                (100_096, 3000, 5, 2**33 + 3, True)]
    base = (torch.randn(103_200, generator=torch.Generator().manual_seed(1)) * 1e-2).to(dtype)
    one, many = base.cuda(), base.cuda()
    args = ([1, 2**40 + 3], [3e-4, -1e-4])
    for rounding in ("nearest", "stochastic"):
        noise.add_segments_(one, segments, *args, "gaussian", 0.99, rounding, 7)
        for off, n, key, start, decays in segments:
            noise.add_(many[off: off + n], *args, key, start, "gaussian",
                       0.99 if decays else 1.0, rounding, 7)
        assert torch.equal(one, many)


def test_cuda_update_table_is_made_once_per_update_and_stream():
    from zo2 import _noise_triton as T
    from zo2 import noise

    w = torch.zeros(4096, device="cuda")
    noise.add_(w, [1, 2], [0.5, 0.25], 7)
    table = T._tables[torch.cuda.current_stream()][1]
    noise.add_(w, [1, 2], [0.5, 0.25], 8)  # another parameter, the same update
    assert T._tables[torch.cuda.current_stream()][1] is table
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        noise.add_(w, [1, 2], [0.5, 0.25], 9)
    assert T._tables[side][1] is not table  # its own table on the other stream
    torch.cuda.synchronize()


SHAPES = {"sparse": {"sparsity": 0.75}, "low-rank": {"rank": 2},
          "hizoo-light": {"estimator": "hizoo", "hessian": "factored", "hessian_smooth": 0.1}}


@pytest.mark.parametrize("name", list(SHAPES))
def test_cuda_structured_directions_offloaded_equal_resident(name):
    """Sparse masks, low-rank factors and HiZOO-L's curvature are formed on the upload
    stream for offloaded blocks and on the compute stream for the resident units: the
    same values either way (zo2/directions.py, zo2/hessian.py)."""
    _assert_offloaded_equals_resident(OptimConfig(lr=1e-3, **SHAPES[name]), steps=6)
