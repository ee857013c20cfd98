"""The engine on a CUDA device (skipped without one; CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model

from zo2 import Objective, OptimConfig, ZOEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


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
    from zo2.config import OffloadConfig

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
    from zo2.config import OffloadConfig

    model = make_model("mistral", layers=4)
    engine = ZOEngine(model, OptimConfig(lr=1e-3), Objective("label_words", torch.tensor([5, 9])),
                      offload=OffloadConfig(enabled=True, ring=2), device="cuda")
    assert all(b.host.is_pinned() for b in engine.residency.blocks)
    for i in range(3):
        telemetry = engine.step(make_batch(seed=i)).telemetry
    assert telemetry["offload_uploads"] == 4 and telemetry["gpu_allocated_gb"] > 0


@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_zo_adam_resumes_exactly(offloaded, tmp_path):
    """The moments saved from (and loaded back to) a CUDA run: resumed == uninterrupted."""
    from zo2.config import OffloadConfig

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
