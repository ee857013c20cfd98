"""CPU-side checks of the GPU path: the defects a GPU would show, kept from coming back
where no GPU runs (the GPU tests themselves are in tests/test_gpu.py)."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, make_model

from zo2 import Objective, OptimConfig, ZOEngine
from zo2.config import OffloadConfig

ROOT = Path(__file__).resolve().parent.parent
TRITON_SOURCE = ROOT / "zo2" / "_noise_triton.py"


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls of ``name`` (a dotted name such as ``torch.tensor``) in ``tree``."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == name]


def test_no_device_tensor_is_built_from_python_values_at_a_launch():
    """``torch.tensor(..., device=cuda)`` is a pageable host-to-device copy that blocks
    until the stream drains: none in the Triton wrappers, whose launches run per
    parameter (the update's table goes through page-locked memory, once per update)."""
    tree = ast.parse(TRITON_SOURCE.read_text())
    for name in ("torch.tensor", "torch.as_tensor", "torch.full", "torch.zeros",
                 "torch.ones", "torch.empty"):
        for call in _calls(tree, name):
            assert not any(k.arg == "device" for k in call.keywords), ast.unparse(call)
    tables = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_table"]
    (table,) = tables
    moves = [c for c in ast.walk(table) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Attribute) and c.func.attr == "to"]
    assert moves and all(any(k.arg == "non_blocking" and ast.unparse(k.value) == "True"
                             for k in c.keywords) for c in moves)
    assert "pin_memory" in ast.unparse(table)


def test_every_launch_runs_on_its_tensors_device():
    """Triton launches on the current device: each ``kernel[grid](...)`` must sit inside
    ``with _on_device(...)``, which makes the tensor's device current."""
    tree = ast.parse(TRITON_SOURCE.read_text())
    launches, guarded = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            launches.append(node)
        if isinstance(node, ast.With) and any(
                ast.unparse(item.context_expr).startswith("_on_device(") for item in node.items):
            guarded |= {id(n) for n in ast.walk(node)}
    assert launches and all(id(c) in guarded for c in launches)
    from zo2 import _noise_triton

    on = _noise_triton._on_device(torch.empty(1))  # a CPU tensor (the interpreter): no-op
    with on:
        pass
    assert "torch.cuda.device(t.device)" in inspect.getsource(_noise_triton._on_device)


def test_the_engine_makes_its_cuda_device_current():
    assert "torch.cuda.set_device(self.device)" in inspect.getsource(ZOEngine.__init__)


def test_materialized_rules_keep_one_scratch_per_stream(monkeypatch):
    """zo-sign / momentum / Adam build G in a scratch buffer: one per stream, so the
    upload stream (offloaded blocks) and the compute stream (resident units) never
    share one, nor free one the other still uses."""
    from zo2 import rules

    rule = rules.Sign()
    current = ["compute"]
    monkeypatch.setattr(rules, "stream_of", lambda device: (device, current[0]))
    cpu = torch.device("cpu")
    a = rule.scratch(8, cpu)
    current[0] = "upload"
    b = rule.scratch(8, cpu)
    assert a.data_ptr() != b.data_ptr()
    assert rule.scratch(4, cpu).data_ptr() == b.data_ptr()  # reused on its own stream
    current[0] = "compute"
    grown = rule.scratch(64, cpu)  # grows on the compute stream only
    current[0] = "upload"
    assert rule.scratch(8, cpu).data_ptr() == b.data_ptr() and grown.numel() == 64


def test_telemetry_is_collected_when_asked_and_covers_the_steps_since():
    """``step(telemetry=False)`` collects nothing; the next collection reports the
    transfers of every step since the last one (the peak likewise, on a GPU)."""
    engine = ZOEngine(make_model("llama", layers=3), OptimConfig(lr=1e-3),
                      Objective("label_words", torch.tensor([5, 9])),
                      offload=OffloadConfig(enabled=True, ring=2))
    engine.step(make_batch(seed=0))  # the first pass learns the order
    one = engine.step(make_batch(seed=1)).telemetry
    quiet = [engine.step(make_batch(seed=i), telemetry=False) for i in (2, 3)]
    assert all(r.telemetry == {} for r in quiet)
    three = engine.step(make_batch(seed=4)).telemetry
    assert three["offload_uploads"] == 3 * one["offload_uploads"] > 0
    assert three["offload_up_mb"] == pytest.approx(3 * one["offload_up_mb"], rel=1e-12)
    assert engine.telemetry()["offload_uploads"] == 0  # nothing since


def test_nvml_is_looked_up_by_uuid_and_initialised_once(monkeypatch):
    """NVML numbers every GPU of the machine, CUDA only the visible ones: look a device
    up by UUID (else PCI bus id), never by its CUDA index; init NVML once."""
    from zo2.offload import telemetry

    seen = []

    def by_uuid(key):
        seen.append(("uuid", key))
        if key != "GPU-1234":
            raise LookupError(key)
        return "handle-uuid"

    def by_pci(key):
        seen.append(("pci", key))
        return "handle-pci"

    def by_index(index):
        raise AssertionError("looked up by CUDA index")

    inits = []
    fake = SimpleNamespace(nvmlInit=lambda: inits.append(1), nvmlDeviceGetHandleByUUID=by_uuid,
                           nvmlDeviceGetHandleByPciBusId=by_pci,
                           nvmlDeviceGetHandleByIndex=by_index)
    assert telemetry.nvml_lookup(fake, "GPU-1234", None) == "handle-uuid"
    assert telemetry.nvml_lookup(fake, "GPU-9", "00000000:3b:00.0") == "handle-pci"
    assert seen[-2:] == [("uuid", "GPU-9"), ("pci", "00000000:3b:00.0")]

    props = SimpleNamespace(uuid="1234", pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    from zo2.offload.device import Device

    gpus = []
    for index in (0, 1):
        gpu = Device("cpu")  # a CUDA device on a machine without one: its keys are faked
        gpu.device = torch.device("cuda", index)
        gpus.append(gpu)
    assert gpus[0].nvml_keys() == ("GPU-1234", "00000000:3b:00.0")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(telemetry, "_nvml", None)
    monkeypatch.setattr(telemetry, "_handles", {})
    for _ in range(3):
        for gpu in gpus:
            telemetry._nvml_handle(gpu)
    assert len(inits) == 1 and telemetry._handles == {0: "handle-uuid", 1: "handle-uuid"}


BLOCKED_IMPORTS = """
import importlib.abc, sys

BLOCKED = {"numba", "llvmlite", "hydra", "omegaconf", "wandb", "ray", "deepspeed", "pytest"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (not on the GPU machine)")
        return None

sys.meta_path.insert(0, Block())
import torch
import zo2, zo2.engine, zo2.offload, zo2.parallel.comm, zo2.rules, zo2.noise
from zo2 import _noise_triton as T
w = torch.zeros(1000)
T.add_(w, [1, 2], [0.5, -0.25], 1.0, 7, 3, True)  # the Triton kernel, interpreted
assert w.abs().sum() > 0
print("imports-ok", sorted(m for m in BLOCKED if m in sys.modules))
"""


def test_the_engine_and_the_gpu_kernels_import_without_cpu_only_packages(tmp_path):
    """The GPU machine has no numba, hydra, wandb, ray, deepspeed or pytest: importing
    the engine and running the Triton update kernel must need none of them."""
    script = tmp_path / "imports.py"
    script.write_text(textwrap.dedent(BLOCKED_IMPORTS))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "imports-ok []" in res.stdout, res.stderr[-3000:]
