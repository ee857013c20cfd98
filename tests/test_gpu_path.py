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


def test_disk_tier_stages_through_pinned_buffers_and_matches_resident(tmp_path, monkeypatch):
    """A mapping is pageable memory: on a GPU, blocks on disk go up and come back
    through the ring of staging buffers (run here on the CPU with the same code)."""
    from zo2.offload import transfers

    monkeypatch.setattr(transfers, "STAGE_ON_CPU", True)
    batches = [make_batch(seed=i) for i in range(6)]
    model = make_model("qwen2", layers=4)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    config = OffloadConfig(enabled=True, ring=2, disk_dir=str(tmp_path / "blocks"),
                           host_budget_gb=1.5 * layer_bytes / 2**30)  # one layer in RAM
    runs, landed = [], []

    def watch(res, original):
        def land(stage):
            landed.append(stage.landing)
            original(stage)
        res._land = land  # this instance only

    for offload in (None, config):
        engine = ZOEngine(make_model("qwen2", layers=4), OptimConfig(lr=1e-3),
                          Objective("label_words", torch.tensor([5, 9])), seed=3,
                          offload=offload)
        if offload is not None:
            res = engine.residency
            bus = res.transfers
            assert len(bus.staging) == 2 and sum(b.disk is not None for b in res.blocks) == 3
            watch(bus, bus._land)
        losses = [engine.step(b).losses for b in batches]
        runs.append((losses, {k: v.clone() for k, v in engine.export_state_dict().items()}))
    assert any(b is not None and b.disk is not None for b in landed)  # write-backs landed
    assert all(s.landing is None for s in bus.staging)  # export waited for every one
    (la, wa), (lb, wb) = runs
    assert la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)
    disk_block = next(b for b in res.blocks if b.disk is not None)
    entry = disk_block.entries[0]
    assert torch.equal(disk_block.view(disk_block.disk.tensor, entry), wa[entry.name])


def test_pinned_arena_is_sized_from_the_blocks_kept_in_host_memory():
    from zo2.offload.store import Block, host_blocks

    blocks = []
    for i, numel in enumerate((100, 300, 100, 50)):
        block = Block(f"b{i}", [])
        block.numel = block.hi = numel
        blocks.append(block)
    kept = host_blocks(blocks, torch.float32, "/disk", 4 * 250)  # 250 float32 elements
    assert [b.name for b in kept] == ["b0", "b2", "b3"]  # b1 does not fit: it goes to disk
    assert host_blocks(blocks, torch.float32, None, 0) == blocks  # no disk tier: all
    blocks[0].codes_numel = 200  # a quantized block: its codes lane counts too (1 byte each)
    assert blocks[0].host_bytes(torch.float32) == 4 * 100 + 200
    assert blocks[0].host_bytes(torch.bfloat16) == 2 * 100 + 200
    kept = host_blocks(blocks, torch.float32, "/disk", 4 * 250)
    assert [b.name for b in kept] == ["b0", "b2"]  # 600 + 400 bytes: b3's 200 do not fit
    src = inspect.getsource(__import__("zo2.offload.scheduler", fromlist=["x"]).Offloader)
    assert "total=pinned" in src and "in_host = host_blocks(" in src


def test_node_pinning_more_than_the_host_has_is_a_clear_error():
    from zo2.errors import ConfigError
    from zo2.offload.store import check_host_memory

    check_host_memory(8, 10 * 2**30, available=80 * 2**30)  # fits exactly
    with pytest.raises(ConfigError, match=r"8 rank\(s\) on this node would pin 8 x 10.0 GiB"
                                          r" = 80.0 GiB .* only 79.0 GiB are available"):
        check_host_memory(8, 10 * 2**30, available=79 * 2**30)


def test_slicing_auto_says_when_it_turns_itself_off(caplog):
    from zo2.offload import Device
    from zo2.parallel.slicing import slice_group

    mesh = SimpleNamespace(config=SimpleNamespace(slicing="auto"), distributed=True,
                           env=SimpleNamespace(local_world=2, local_rank=0),
                           device=torch.device("cpu"))
    cpu = Device("cpu")
    with caplog.at_level("WARNING", logger="zo2"):
        assert slice_group(mesh, cpu) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["parallel.slicing=auto: off (no GPUs); each of the 2 ranks of this node "
                     "keeps and pins the whole offloaded model"]
    mesh.env.local_rank = 1
    caplog.clear()
    assert slice_group(mesh, cpu) is None and not caplog.records  # rank 0 says it


def test_write_back_waits_for_its_slots_upload_and_freed_rings_for_the_side_streams():
    """A slot dropped before the compute stream used it (a stale prefetch) is written back
    after its upload and the update riding on it; ring buffers dropped or freed by
    invalidate / materialize are reused only after the upload and write-back streams."""
    engine = ZOEngine(make_model("llama", layers=3), OptimConfig(lr=1e-3),
                      Objective("label_words", torch.tensor([5, 9])),
                      offload=OffloadConfig(enabled=True, ring=2))
    for i in range(2):
        engine.step(make_batch(seed=i))
    res = engine.residency
    waited = []
    res.device.wait = lambda stream, event: waited.append(event)  # this instance only
    slot = next(s for s in res._slots if s.block is not None)
    ready, free = slot.ready, slot.free = object(), object()
    res.transfers.write_back(slot.block, slot)
    assert waited[:2] == [ready, free]
    quiesced = []
    res.transfers.quiesce = lambda: quiesced.append(len(res._slots))
    engine.store.invalidate()  # the offloaded weights' state, through the scheduler
    engine.store.materialize()
    assert quiesced == [2, 2] and res._slots == []  # before the ring was let go


def test_multi_gpu_docker_runs_are_documented_with_host_ipc():
    """NCCL fails in Docker's default 64 MB /dev/shm: every documented `docker run`
    with GPUs passes --ipc=host (or --shm-size), and the README of the images says why."""
    docs = {p: p.read_text() for p in (ROOT / "docker" / "README.md", ROOT / "docker" /
                                       "Dockerfile", ROOT / "README.md")}
    runs = [(p.name, line) for p, text in docs.items() for line in text.splitlines()
            if "docker run" in line and "--gpus" in line]
    assert len(runs) >= 5
    assert all("--ipc=host" in line or "--shm-size" in line for _, line in runs), runs
    assert "/dev/shm" in docs[ROOT / "docker" / "README.md"]


def _save_worker(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: gather slices to the writer; wait for a slow writer."""
    import json as _json
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from zo2.errors import DistributedError
    from zo2.parallel.mesh import Mesh, ProcessGroups
    from zo2.parallel.slicing import SliceGroup

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))  # parallel.timeout_s = 2
    group = SliceGroup(rank=rank, size=2, group=dist.group.WORLD,
                       host_group=dist.group.WORLD, timeout_s=2)
    got = group.gather_host(torch.arange(3.0) + 10 * rank)
    errors = []
    for save_timeout in (30, 1):
        mesh = SimpleNamespace(distributed=True, config=SimpleNamespace(
            save_timeout_s=save_timeout), groups=ProcessGroups(save=dist.new_group(
                backend="gloo", timeout=timedelta(seconds=save_timeout))))
        if rank == 0:
            time.sleep(4)  # writing: longer than parallel.timeout_s
        try:
            Mesh.wait_for_writer(mesh)
        except DistributedError as err:
            errors.append(str(err))
    Path(out, f"{rank}.json").write_text(_json.dumps(
        {"got": None if got is None else got.tolist(), "errors": errors}))


def test_saving_with_slicing_gathers_to_the_writer_and_waits_with_its_own_timeout(tmp_path):
    """Only the writer (rank 0) receives whole blocks; the others wait for its write
    with parallel.save_timeout_s (longer than the collective timeout), and a writer
    slower than that is named as such."""
    import json as _json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_save_worker, args=(init, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (_json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["got"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0] and r1["got"] is None
    (error,) = r1["errors"]  # the 4 s write passed under 30 s and failed under 1 s
    assert "wait for the checkpoint write failed" in error
    assert "parallel.save_timeout_s=1 s" in error


HOT_PATH = {  # file -> functions that run for every unit of every step
    "offload/scheduler.py": ("acquire", "release", "begin_pass", "end_pass", "_prefetch",
                             "_load", "_finish", "_upload", "_apply_update", "_take_slot",
                             "_drop", "_advance"),
    "offload/transfers.py": ("upload", "wait_ready", "write_back"),
    "zo2/_noise_triton.py": ("_launch", "_on_device", "_table", "_segments", "fill",
                             "combine", "add_", "add_segments_"),
    "zo2/rules.py": ("estimate", "scratch", "apply", "chunk", "step", "stream_of"),
}
HOST_SYNCS = (".item(", ".tolist(", ".cpu(", ".numpy(", "torch.cuda.synchronize",
              "torch.tensor(", ".synchronize(")


def test_no_host_sync_is_written_into_the_hot_path():
    """What the GPU test checks with torch's sync debug mode, kept here as source rules:
    no read-back, no tensor built from Python values on the device, no device-wide sync
    in the functions every unit runs (the staging buffers' event waits of the disk tier
    and compressed wire are host waits by design, in ``_land``)."""
    found = []
    for path, names in HOT_PATH.items():
        tree = ast.parse((ROOT / path).read_text())
        functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        for name in names:
            source = ast.unparse(functions[name])
            found += [(path, name, bad) for bad in HOST_SYNCS if bad in source]
    # the two tables are built on the host, then pinned and copied without blocking
    allowed = [("zo2/_noise_triton.py", "_table", "torch.tensor("),
               ("zo2/_noise_triton.py", "_segments", "torch.tensor(")]
    assert found == allowed, found
