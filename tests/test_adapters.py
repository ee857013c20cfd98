"""Parameter-efficient ZO (peft LoRA / prefix tuning): only adapters move, offloaded ==
resident, only adapter bytes are written back, and the exported adapter loads in peft."""

from __future__ import annotations

import json

import pytest
import torch
from _objectives import Ascent
from conftest import make_batch, make_model
from safetensors.torch import load_file

from zo2.adapters import (
    AdapterConfig,
    from_peft_format,
    is_peft_folder,
    save_adapter,
    validate_adapter,
    wrap,
)
from zo2.config import OffloadConfig, OptimConfig
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.loss import Objective

LABELS = torch.tensor([5, 9])
BATCH = make_batch(batch=8, seed=1)
LORA = AdapterConfig(kind="lora", r=4, alpha=8.0)
PREFIX = AdapterConfig(kind="prefix", num_virtual_tokens=4)


def engine_for(family: str, adapter: AdapterConfig, offload: OffloadConfig | None = None,
               lr: float = 5e-2, steps: int = 10, objective: type = Objective) -> ZOEngine:
    model, trainable = wrap(make_model(family), adapter, seed=7)
    return ZOEngine(model, OptimConfig(lr=lr, eps=1e-2), objective("label_words", LABELS),
                    seed=1, total_steps=steps, trainable=trainable, offload=offload)


def is_adapter(name: str) -> bool:
    return ".default." in name


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_and_check(engine: ZOEngine, steps: int, ascent: ZOEngine) -> dict[str, torch.Tensor]:
    """Train ``engine``; ``ascent``, the same on the negated loss (``_objectives.Ascent``),
    must end above the start where ``engine`` ends below it."""
    before = snapshot(engine.model)
    first = engine.evaluate([BATCH])["loss"]
    for _ in range(steps):
        engine.step(BATCH)
        ascent.step(BATCH)
    last = engine.evaluate([BATCH])["loss"]
    up = -ascent.evaluate([BATCH])["loss"]
    engine.close()
    ascent.close()
    after = snapshot(engine.model)
    assert last < first < up, (last, first, up)
    frozen = [n for n in before if not is_adapter(n)]
    adapters = [n for n in before if is_adapter(n)]
    assert frozen and adapters
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in adapters)
    return after


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lora_zo_lowers_the_loss_and_moves_only_the_adapters(family):
    engine = engine_for(family, LORA)
    assert all(".lora_" in p.name for p in engine.params)
    after = train_and_check(engine, 10, engine_for(family, LORA, objective=Ascent))
    assert not any(torch.equal(after[n], torch.zeros_like(after[n]))
                   for n in after if ".lora_B." in n)  # B starts at zero: every one moved


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_offloaded_lora_equals_resident_and_writes_back_adapters_only(family):
    resident = engine_for(family, LORA)
    offloaded = engine_for(family, LORA, OffloadConfig(enabled=True, ring=2))
    blocks = offloaded.residency.blocks
    assert len(blocks) == 2  # the decoder layers, base weights and adapters together
    for _ in range(4):
        assert offloaded.step(BATCH).losses == resident.step(BATCH).losses
    fifth = offloaded.step(BATCH).telemetry  # the fourth step's update went down in it
    resident.step(BATCH)
    adapter_bytes = sum(-(-p.numel() // 64) * 64 * 4 for b in blocks for e in b.trainable
                        for p in [e.param])
    block_bytes = sum(b.numel * 4 for b in blocks)
    assert fifth["offload_writebacks"] == 2
    assert fifth["offload_down_mb"] == adapter_bytes / 2**20  # the same integers of bytes
    assert fifth["offload_up_mb"] == block_bytes / 2**20
    assert adapter_bytes < block_bytes / 10
    a, b = snapshot_closed(offloaded), snapshot_closed(resident)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def snapshot_closed(engine: ZOEngine) -> dict[str, torch.Tensor]:
    engine.close()
    return snapshot(engine.model)


def test_prefix_tuning_moves_only_the_prefix():
    engine = engine_for("llama", PREFIX, lr=2.0)
    assert [u.name for u in engine.units] == ["prompt_encoder.default.embedding"]
    train_and_check(engine, 10, engine_for("llama", PREFIX, lr=2.0, objective=Ascent))


@pytest.mark.parametrize("adapter,offload", [(LORA, True), (PREFIX, False)],
                         ids=["lora-offloaded", "prefix"])
def test_exported_adapter_loads_in_peft(tmp_path, adapter, offload):
    from peft import PeftModel

    engine = engine_for("llama", adapter, OffloadConfig(enabled=True) if offload else None,
                        lr=0.5)
    for _ in range(3):
        engine.step(BATCH)
    save_adapter(engine, tmp_path)  # before close: the pending update must be in it
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file() and is_peft_folder(tmp_path)
    renamed = from_peft_format(engine.model, load_file(tmp_path / "adapter_model.safetensors"))
    assert sorted(renamed) == sorted(p.name for p in engine.params)  # loadable by name
    engine.close()
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    mine = {n: p for n, p in engine.model.named_parameters() if is_adapter(n)}
    theirs = {n: p for n, p in loaded.named_parameters() if is_adapter(n)}
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    with torch.no_grad():
        ids, mask = BATCH["input_ids"], BATCH["attention_mask"]
        expected = engine.model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    if adapter.kind == "lora":
        # peft's merge of the exported adapter is W + (B @ A) * alpha / r with the saved
        # config's alpha and r: the same float32 ops here, so bit for bit. (The merged
        # forward, x (W + B A s), rounds differently from x W + ((x A) B) s: not compared.)
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        scaling = saved["lora_alpha"] / saved["r"]
        assert scaling == adapter.alpha / adapter.r
        lora = dict(loaded.named_parameters())
        expected_w, count = {}, 0
        for name, w in make_model("llama").named_parameters():
            module = name.rsplit(".", 1)[0]
            key = f"base_model.model.{module}.lora_A.default.weight"
            if name.endswith(".weight") and key in lora:
                b = lora[key.replace("lora_A", "lora_B")]
                w = w + (b @ lora[key]) * scaling
                count += 1
            expected_w[name] = w
        merged = dict(loaded.merge_and_unload().named_parameters())
        assert count == sum(".lora_A." in n for n in lora) > 0  # every adapter merged
        assert merged.keys() == expected_w.keys()
        for name in merged:
            assert torch.equal(merged[name], expected_w[name]), name


def test_wrap_without_adapter_and_validation():
    model = make_model("llama")
    assert wrap(model, AdapterConfig(), ["*layers*"]) == (model, ["*layers*"])
    with pytest.raises(ConfigError, match="model.adapter.kind"):
        validate_adapter(AdapterConfig(kind="ia3"))
    with pytest.raises(ConfigError, match="model.adapter.r"):
        validate_adapter(AdapterConfig(kind="lora", r=0))
    with pytest.raises(ConfigError, match="model.trainable"):
        validate_adapter(LORA, ["*layers*"])


def _resume_build(kind: str, offload: bool):
    model, globs = wrap(make_model("llama"), AdapterConfig(kind=kind, r=4, num_virtual_tokens=4),
                        seed=7)
    engine = ZOEngine(model, OptimConfig(lr=0.5, eps=1e-2),
                      Objective("label_words", torch.tensor([5, 9])), seed=1, total_steps=6,
                      trainable=globs, offload=OffloadConfig(enabled=offload))
    return engine, globs


@pytest.mark.parametrize("kind", ["lora", "prefix"])
@pytest.mark.parametrize("offload", [False, True])
def test_adapter_checkpoints_resume_exactly_and_the_seed_log_replays(tmp_path, kind, offload):
    """engine.save on a peft model writes peft's adapter-only folder; loading it back
    continues exactly, and the seed log replayed onto a fresh adapter gives the weights."""
    from zo2.seedlog import SeedLog, replay

    batch = make_batch(batch=8, seed=1)
    a, globs = _resume_build(kind, offload)
    assert a._takes_keep  # peft passes logits_to_keep through to the base model
    for _ in range(3):
        a.step(batch)
    a.save(tmp_path / "ck")
    rest = [a.step(batch).losses for _ in range(3)]
    b, _ = _resume_build(kind, offload)
    b.load(tmp_path / "ck")
    assert [b.step(batch).losses for _ in range(3)] == rest
    log = SeedLog.from_engine(a, globs)
    a.close()
    b.close()
    fresh, _ = wrap(make_model("llama"), AdapterConfig(kind=kind, r=4, num_virtual_tokens=4),
                    seed=7)
    replay(fresh, log)
    ref = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        assert torch.equal(p, ref[name]), name
    for name, p in fresh.named_parameters():
        assert torch.equal(p, ref[name]), name
