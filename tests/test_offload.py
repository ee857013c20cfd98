"""ZO2 offloading on the CPU: offloaded == resident, bounded device memory, disk tier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_batch, make_model
from safetensors import safe_open

from zo2 import noise
from zo2.config import OffloadConfig, OptimConfig
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.loss import Objective

LABELS = torch.tensor([5, 9])
BATCHES = [make_batch(seed=i) for i in range(20)]


def engine_for(model, offload: OffloadConfig | None = None, **optim) -> ZOEngine:
    optim.setdefault("lr", 1e-3)
    return ZOEngine(model, OptimConfig(**optim), Objective("label_words", candidates=LABELS),
                    seed=3, total_steps=len(BATCHES), offload=offload)


def train(engine: ZOEngine, steps: int = len(BATCHES)) -> list[list[float]]:
    return [engine.step(batch).losses for batch in BATCHES[:steps]]


def final_weights(engine: ZOEngine) -> dict[str, torch.Tensor]:
    engine.close()
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("layers_only", [True, False], ids=["resident-head", "all-offloaded"])
@pytest.mark.parametrize("ring", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_equals_resident(family, ring, layers_only):
    resident = engine_for(make_model(family, layers=4))
    offloaded = engine_for(make_model(family, layers=4),
                           OffloadConfig(enabled=True, ring=ring, layers_only=layers_only))
    assert offloaded.residency.blocks, "nothing was offloaded"
    assert train(offloaded) == train(resident)  # every loss of every slice, exactly
    assert_same(final_weights(offloaded), final_weights(resident))


def test_untied_head_and_frozen_parameters_stream_too():
    trainable = ["*layers.*", "*norm*"]  # embeddings and head frozen, some layer params frozen
    kwargs = dict(lr=1e-3)
    resident = ZOEngine(make_model("llama", layers=3, tie=False), OptimConfig(**kwargs),
                        Objective("label_words", candidates=LABELS), trainable=trainable)
    offloaded = ZOEngine(make_model("llama", layers=3, tie=False), OptimConfig(**kwargs),
                         Objective("label_words", candidates=LABELS), trainable=trainable,
                         offload=OffloadConfig(enabled=True, ring=2, layers_only=False))
    for batch in BATCHES[:6]:
        assert offloaded.step(batch).losses == resident.step(batch).losses
    assert_same(final_weights(offloaded), final_weights(resident))


def test_resident_globs_keep_chosen_layers_on_the_device():
    engine = engine_for(make_model("qwen2", layers=4),
                        OffloadConfig(enabled=True, resident=["model.layers.0"]))
    names = {b.name for b in engine.residency.blocks}
    assert names == {"model.layers.1", "model.layers.2", "model.layers.3"}
    assert [u.name for u in engine.residency.resident_units if "layers" in u.name] == [
        "model.layers.0"]


def test_device_bytes_do_not_grow_with_depth():
    def device_bytes(layers: int, offload: bool) -> tuple[int, int]:
        config = OffloadConfig(enabled=offload, ring=2)
        engine = engine_for(make_model("llama", layers=layers, hidden=64), config)
        engine.step(BATCHES[0])
        engine.step(BATCHES[1])
        if not offload:
            return sum(p.numel() * p.element_size() for p in engine.model.parameters()), 0
        off = engine.residency
        block = max(b.numel for b in off.blocks) * 4
        resident = sum(p.numel() * p.element_size() for u in off.resident_units
                       for p in u.module.parameters())
        assert off.device_bytes() <= 2 * block + resident + 4096  # K units + resident ones
        return off.device_bytes(), block

    shallow, block = device_bytes(4, True)
    deep, _ = device_bytes(24, True)
    assert deep == shallow
    resident_deep, _ = device_bytes(24, False)
    assert deep < resident_deep / 4  # and far below keeping the model on the device


def test_each_block_crosses_the_bus_once_each_way_per_step():
    engine = engine_for(make_model("mistral", layers=4), OffloadConfig(enabled=True, ring=2))
    block_mb = sum(b.numel for b in engine.residency.blocks) * 4 / 2**20
    first, second = (engine.step(batch).telemetry for batch in BATCHES[:2])
    assert first["offload_uploads"] == 4 and first["offload_writebacks"] == 0  # nothing pending
    second = {**second, **engine.residency.report()}  # write-backs still in flight count later
    engine.step(BATCHES[2])
    third = engine.step(BATCHES[3]).telemetry
    assert third["offload_uploads"] == 4 and third["offload_writebacks"] == 4
    assert third["offload_up_mb"] == block_mb  # the same integer of bytes, / 2**20
    assert third["offload_down_mb"] == block_mb
    assert third["offload_device_mb"] > 0


def test_evaluation_and_checkpoints_include_the_last_update(tmp_path):
    resident = engine_for(make_model("opt", layers=3), lr=1e-2)
    offloaded = engine_for(make_model("opt", layers=3), OffloadConfig(enabled=True, ring=1),
                           lr=1e-2)
    for batch in BATCHES[:3]:
        resident.step(batch)
        offloaded.step(batch)
    assert offloaded.evaluate(BATCHES[:2]) == resident.evaluate(BATCHES[:2])
    offloaded.step(BATCHES[3])
    resident.step(BATCHES[3])
    offloaded.save(tmp_path / "ckpt")  # step 3's update is pending until here
    fresh = engine_for(make_model("opt", layers=3, seed=7))
    fresh.load(tmp_path / "ckpt")
    assert_same(final_weights(fresh), final_weights(resident))


def test_a_checkpoint_loads_into_an_offloaded_engine(tmp_path):
    source = engine_for(make_model("qwen3", layers=3))
    train(source, 4)
    source.save(tmp_path / "ckpt")
    target = engine_for(make_model("qwen3", layers=3, seed=5), OffloadConfig(enabled=True))
    target.step(BATCHES[0])  # device copies of the old weights exist now
    target.load(tmp_path / "ckpt")
    assert target.evaluate(BATCHES[:2]) == source.evaluate(BATCHES[:2])


def test_disk_tier_trains_and_matches_resident(tmp_path):
    resident = engine_for(make_model("qwen2", layers=4))
    model = make_model("qwen2", layers=4)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    config = OffloadConfig(enabled=True, ring=2, disk_dir=str(tmp_path / "blocks"),
                           host_budget_gb=1.5 * layer_bytes / 2**30)  # one layer in RAM
    offloaded = engine_for(model, config)
    on_disk = [b for b in offloaded.residency.blocks if b.disk is not None]
    assert 0 < len(on_disk) < len(offloaded.residency.blocks)
    assert train(offloaded, 8) == train(resident, 8)
    offloaded.flush()
    offloaded.residency.synchronize()
    block = on_disk[0]
    path = Path(block.disk.path)
    with safe_open(str(path), framework="pt") as f:  # the file holds the updated weights
        flat = f.get_tensor("flat")
        layout = {e["name"]: e for e in json.loads(f.metadata()["zo2_layout"])["entries"]}
    entry = block.entries[0]
    assert layout[entry.name]["offset"] == entry.offset
    model_weights = {k: v for k, v in resident.export_state_dict().items()}
    assert torch.equal(block.view(flat, entry), model_weights[entry.name])
    assert_same(final_weights(offloaded), final_weights(resident))


def replay_fp32(initial: torch.Tensor, name: str, log: list[dict]) -> torch.Tensor:
    """The fp32 master the seed log implies: the update applied in fp32, step by step."""
    w = initial.float().clone().view(-1)
    for record in log:
        noise.add_(w, record["seeds"], record["coefs"], noise.param_key(name),
                   decay=record["decay"], dist="rademacher")
    return w.view_as(initial)


@pytest.mark.parametrize("wire", ["bfloat16", "float8_e4m3fn"])
def test_updates_below_wire_resolution_accumulate_in_the_fp32_master(wire):
    optim = dict(lr=1e-8, eps=1e-2, direction="rademacher")  # each element moves by +-|coef|
    name = "model.layers.1.mlp.up_proj.weight"
    initial = dict(make_model("llama", layers=2).named_parameters())[name].detach().bfloat16()
    big = initial.float().abs() >= 2**-8  # bf16 resolution there: >= 2**-16

    nearest = engine_for(make_model("llama", layers=2, dtype=torch.bfloat16), **optim)
    train(nearest, 10)
    drift = sum(abs(c) for record in nearest.log for c in record["coefs"])
    assert 0 < drift < 2**-17  # the premise: all 10 updates together stay below half a bf16 ulp
    assert torch.equal(final_weights(nearest)[name][big], initial[big])  # rounded away

    config = OffloadConfig(enabled=True, host_dtype="float32", wire_dtype=wire)
    master = engine_for(make_model("llama", layers=2, dtype=torch.bfloat16), config, **optim)
    assert master.residency.master_on_host
    train(master, 10)
    assert len(master.log) == 10
    host = master.export_state_dict()[name]
    assert host.dtype == torch.float32
    assert torch.equal(host, replay_fp32(initial.float(), name, master.log))  # bit-exact fp32
    moved = (host - initial.float()).abs()[big]
    assert (moved > 0).float().mean() > 0.9 and moved.max() < 2**-17  # sub-ulp steps kept


def test_offload_config_errors_name_the_field():
    from zo2.config import validate_offload

    with pytest.raises(ConfigError, match=r"offload\.ring"):
        validate_offload(OffloadConfig(enabled=True, ring=0))
    with pytest.raises(ConfigError, match=r"offload\.host_dtype.*float32"):
        validate_offload(OffloadConfig(enabled=True, wire_dtype="float8_e4m3fn"))
    with pytest.raises(ConfigError, match=r"offload\.wire_dtype"):
        validate_offload(OffloadConfig(enabled=True, host_dtype="float32", wire_dtype="int8"))


def test_only_the_device_module_calls_the_cuda_runtime():
    root = Path(__file__).resolve().parents[1] / "offload"
    offenders = [p.name for p in root.glob("*.py")
                 if p.name != "device.py" and re.search(r"torch\.cuda\.", p.read_text())]
    assert offenders == []


def test_no_host_blocking_wait_in_the_hot_path(monkeypatch):
    """Steps never wait for the whole device nor on an event from the host."""
    from zo2.offload.device import HostEvent

    def forbidden(*_):
        raise AssertionError("host-blocking wait during a step")

    engine = engine_for(make_model("qwen3", layers=4), OffloadConfig(enabled=True, ring=2))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(HostEvent, "synchronize", forbidden)
    train(engine, 4)
    monkeypatch.undo()
    engine.flush()


def test_a_model_built_empty_streams_from_its_checkpoint(tmp_path):
    """Parameters on meta, read block by block from safetensors: the disk-tier path for
    models larger than host memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zo2.offload.lazy_weights import SafetensorsWeights, empty_model

    make_model("mistral", layers=3).save_pretrained(tmp_path / "ckpt")
    resident = engine_for(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval())
    model = empty_model(AutoConfig.from_pretrained(tmp_path / "ckpt")).eval()
    assert all(p.is_meta for p in model.parameters())
    config = OffloadConfig(enabled=True, ring=2, disk_dir=str(tmp_path / "blocks"))
    offloaded = ZOEngine(model, OptimConfig(lr=1e-3), Objective("label_words", candidates=LABELS),
                         seed=3, total_steps=len(BATCHES), offload=config,
                         weights=SafetensorsWeights(tmp_path / "ckpt"))
    assert not any(p.is_meta for p in model.parameters())
    assert train(offloaded, 5) == train(resident, 5)
    assert_same(final_weights(offloaded), final_weights(resident))


def test_pinned_arena_packs_blocks_into_power_of_two_slabs():
    from zo2.offload.store import PinnedArena

    def arena_for(layer: int, layers: int, device: str):
        slabs = []

        def allocate(nbytes: int) -> torch.Tensor:
            slabs.append(nbytes)
            return torch.zeros(nbytes, dtype=torch.uint8, device=device)

        arena = PinnedArena(allocate, largest=layer * 2, total=layers * layer * 2)
        return [arena.take(layer, torch.float16) for _ in range(layers)], slabs

    layer = 1_230_000_000 // 2  # fp16 elements of a 30B-model layer (1.23 GB), sizes only
    pieces, slabs = arena_for(layer, 48, "meta")
    assert all(n & (n - 1) == 0 for n in slabs)  # powers of two: nothing rounded up again
    assert sum(slabs) < 1.15 * 48 * layer * 2  # vs 1.75x for one pinned buffer per layer
    assert all(p.numel() == layer and p.dtype == torch.float16 for p in pieces)

    pieces, _ = arena_for(1000, 40, "cpu")  # real memory, small
    for i, piece in enumerate(pieces):
        piece.fill_(i)
    assert all(bool((piece == i).all()) for i, piece in enumerate(pieces))  # disjoint


def test_stochastic_rounding_offloaded_equals_resident_and_keeps_small_updates():
    optim = dict(lr=4e-6, eps=1e-2, direction="rademacher", rounding="stochastic")
    name = "model.layers.1.mlp.up_proj.weight"
    model = lambda: make_model("llama", layers=2, hidden=64, dtype=torch.bfloat16)  # noqa: E731
    initial = dict(model().named_parameters())[name].detach().float()

    resident = engine_for(model(), **optim)
    config = OffloadConfig(enabled=True, host_dtype="bfloat16")
    offloaded = engine_for(model(), config, **optim)
    assert train(offloaded, 10) == train(resident, 10)
    weights = final_weights(offloaded)
    assert_same(weights, final_weights(resident))

    # Each update is below half a bf16 ulp (nearest rounding would drop every one), yet
    # the rounded weights follow the fp32 sum of the updates on average: regress the
    # displacement on the expected one.
    binade = (initial.abs() >= 2**-6) & (initial.abs() < 2**-5)  # one ulp: 2**-13
    assert max(abs(c) for record in offloaded.log for c in record["coefs"]) < 2**-14
    expected = (replay_fp32(initial, name, offloaded.log) - initial)[binade].double()
    moved = (weights[name].float() - initial)[binade].double()
    slope = float((moved * expected).sum() / (expected * expected).sum())
    assert 0.7 < slope < 1.3, slope  # nearest rounding would give 0
    assert float((moved != 0).double().mean()) > 0.05


def test_slice_ranks_check_once_that_they_cut_the_same_blocks():
    from zo2.errors import ConfigError
    from zo2.offload.scheduler import check_same_blocks

    blocks = engine_for(make_model("llama", layers=2),
                        OffloadConfig(enabled=True, ring=1)).residency.blocks

    class Peers:  # two ranks' all-gather: the peer's digest as given
        size = 2

        def __init__(self, peer_delta: int) -> None:
            self.delta = peer_delta

        def all_gather_host(self, mine):
            return torch.cat([mine, mine + self.delta])

    check_same_blocks(blocks, Peers(0))
    with pytest.raises(ConfigError, match="cut the model into different blocks"):
        check_same_blocks(blocks, Peers(1))
