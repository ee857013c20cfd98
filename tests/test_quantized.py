"""Quantized bases (zo2/quantized.py, QZO): tiny models quantized on the fly with
bitsandbytes (nf4, fp4, int8; its CPU backend). ZO trains the continuous scales and
leaves the integer codes bit-identical; the engine's projected gradient is a plain
two-forward finite difference over the scales; clipping bounds it; scales stay above
their floor; resume, seed-log replay and the exported checkpoint are exact; LoRA
trains over a frozen 4-bit base (QLoRA-style)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from zo2 import noise  # noqa: E402
from zo2.adapters import wrap  # noqa: E402
from zo2.config import AdapterConfig, ModelConfig, OffloadConfig, OptimConfig  # noqa: E402
from zo2.engine import ZOEngine  # noqa: E402
from zo2.errors import ConfigError  # noqa: E402
from zo2.export import export_checkpoint  # noqa: E402
from zo2.loss import Objective, positions_to_keep  # noqa: E402
from zo2.perturb import mirror_, step_seed  # noqa: E402
from zo2.quantized import bnb_config, check_supported, portable, scales  # noqa: E402
from zo2.seedlog import SeedLog, replay  # noqa: E402

LABELS = torch.tensor([5, 9])
SCALES = ("*.absmax", "*.SCB")  # the trainable globs of the scales alone


def quantized(tmp_path, fmt: str = "nf4", family: str = "llama", double: bool = False,
              dtype: torch.dtype = torch.float32):
    """A tiny random model saved and loaded back quantized (deterministic: the same
    codes and scales every time)."""
    folder = tmp_path / f"base-{family}"
    if not folder.exists():
        make_model(family, layers=2).save_pretrained(folder)
    config = bnb_config(fmt, dtype)
    if double:
        config.bnb_4bit_use_double_quant = True
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                 device_map="cpu", dtype=dtype)
    portable(model)  # as zo2.models.load_model does: no CPU-specific repacking
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def _engine(model, trainable=("*",), **optim) -> ZOEngine:
    return ZOEngine(model, OptimConfig(**{"lr": 1e-3, **optim}),
                    Objective("label_words", candidates=LABELS), seed=3, total_steps=8,
                    trainable=trainable)


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: p.clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_zo_trains_the_scales_and_float_params_and_never_the_codes(tmp_path, fmt):
    model = quantized(tmp_path, fmt)
    codes = _codes(model)
    assert codes  # the quantized layers' integer weights
    engine = _engine(model)
    names = [p.name for p in engine.params]
    assert not set(codes) & set(names)  # integer tensors are never trainable
    suffix = ".SCB" if fmt == "int8" else ".weight.absmax"
    layers = [n for n, *_ in scales(model)]
    assert layers and all(n.endswith(suffix) for n in layers) and set(layers) <= set(names)
    before = {p.name: p.param.data.clone() for p in engine.params}
    for i in range(3):
        engine.step(make_batch(seed=i))
    engine.flush()
    assert all(torch.equal(codes[n], p) for n, p in model.named_parameters() if n in codes)
    assert all(not torch.equal(before[p.name], p.param.data) for p in engine.params)


def test_the_projected_gradient_is_a_finite_difference_over_the_scales(tmp_path):
    """The engine's g at step 0 against two plain forwards of the unwrapped model with
    every scale at w0 + eps z and at the mirror 2 w0 - (w0 + eps z), as the engine
    forms them: the same arithmetic, so the same bits (the stacked forward is
    row-independent)."""
    batch = make_batch(seed=0)
    eps = 1e-3
    engine = _engine(quantized(tmp_path), trainable=SCALES, eps=eps, lr=0.0)
    got = engine.step(batch).grads[0]
    seed = step_seed(3, 0, 0)
    reference = quantized(tmp_path)
    params = {n: s for n, s, _ in scales(reference)}
    originals = {n: s.data.clone() for n, s in params.items()}
    keep = positions_to_keep(batch["labels"])
    losses = []
    for sign in (1, -1):
        for p in engine.params:
            scale = params[p.name]
            master = scale.data.clone()
            plus = noise.combine(torch.empty_like(master), master, seed, p.key, eps)
            scale.data = plus if sign == 1 else mirror_(plus, master)
        with torch.no_grad():
            logits = reference(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits[:, -keep:]
        losses.append(float(engine.objective.loss(logits, batch["labels"])))
        for n, s in params.items():  # back to the base values
            s.data = originals[n].clone()
    assert got == (losses[0] - losses[1]) / (2 * eps)
    assert got != 0.0


def test_clipping_bounds_the_projected_gradient_and_the_floor_keeps_scales_positive(
        tmp_path):
    engine = _engine(quantized(tmp_path), trainable=SCALES, clip_grad=1e-4)
    grads = [g for i in range(3) for g in engine.step(make_batch(seed=i)).grads]
    assert all(abs(g) <= 1e-4 for g in grads) and any(abs(g) == 1e-4 for g in grads)
    assert [r["grads"][0] for r in engine.log] == grads  # the log keeps the clipped g
    # a step far too large drives many scales below zero: they stop at the floor
    wild = _engine(quantized(tmp_path), trainable=SCALES, lr=1e4, scale_floor=1e-6)
    wild.step(make_batch(seed=0))
    wild.flush()
    values = torch.cat([p.param.data for p in wild.params])
    assert values.min() == 1e-6 and (values == 1e-6).sum() > 0


def test_resume_and_seed_log_replay_are_exact(tmp_path):
    batches = [make_batch(seed=i) for i in range(6)]
    full = _engine(quantized(tmp_path), method="zo-adam")
    for b in batches:
        full.step(b)
    first = _engine(quantized(tmp_path), method="zo-adam")
    for b in batches[:3]:
        first.step(b)
    first.save(tmp_path / "ck")
    resumed = _engine(quantized(tmp_path), method="zo-adam")
    resumed.load(tmp_path / "ck")
    for b in batches[3:]:
        resumed.step(b)
    want, got = full.export_state_dict(), resumed.export_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the seed log rebuilds the fine-tune from the quantized base
    base = quantized(tmp_path)
    replay(base, SeedLog.from_engine(full))
    again = dict(base.state_dict())
    assert all(torch.equal(again[k], want[k]) for k in want)


@pytest.mark.parametrize("fmt,method", [("nf4", "zo-sgd"), ("int8", "zo-sgd"),
                                        ("fp4", "zo-adam")])
def test_offloaded_quantized_blocks_equal_resident_and_move_codes_once(tmp_path, fmt, method):
    """Offloaded, a quantized block keeps its codes in a frozen byte lane uploaded with
    it and never written back; its float scales are trainable entries (updated on the
    device, or on the host for a stateful rule). Same losses and weights as resident."""
    runs = []
    for offload in (None, OffloadConfig(enabled=True, ring=1)):
        engine = ZOEngine(quantized(tmp_path, fmt), OptimConfig(lr=1e-3, method=method),
                          Objective("label_words", candidates=LABELS), seed=3,
                          total_steps=8, trainable=SCALES, offload=offload)
        losses = [engine.step(make_batch(seed=i)).losses for i in range(4)]
        runs.append((losses, engine.export_state_dict(), engine))
    (la, wa, resident), (lb, wb, offloaded) = runs
    assert la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # saved from host memory (its tensors hold placeholders): it loads back quantized,
    # with the resident run's logits
    back = portable(AutoModelForCausalLM.from_pretrained(
        offloaded.save(tmp_path / f"off-{fmt}"), device_map="cpu", dtype=torch.float32))
    ids = make_batch(seed=9)["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, resident.model(input_ids=ids).logits)
    blocks = offloaded.residency.blocks
    assert blocks and all(b.codes for b in blocks)
    # what the pinned-memory budget counts (Block.host_bytes) is what the blocks hold
    held = sum(b.host.numel() * b.host.element_size() + b.codes_host.numel() for b in blocks)
    assert held == sum(b.host_bytes(b.host.dtype) for b in blocks)
    if method == "zo-sgd":  # updated on the device: the bytes of one step, exactly
        offloaded.step(make_batch(seed=5))  # (its figures hold the export's flush too)
        figures = offloaded.step(make_batch(seed=6)).telemetry  # one step's transfers
        up = sum((b.hi - b.lo) * 4 + b.codes_numel for b in blocks)  # float32 lane + codes
        down = sum(b.trained_end * 4 for b in blocks)  # the trained scales only
        assert figures["offload_up_mb"] * 2**20 == up
        assert figures["offload_down_mb"] * 2**20 == down
        assert down < sum(b.numel for b in blocks) * 4  # the frozen norms stay on the host


@pytest.mark.parametrize("method", ["zo-sgd", "zo-adam"])
def test_a_quantized_model_in_bf16_offloads_widened_and_equals_resident(tmp_path, method):
    """A 4-bit layer's scales are float32 (bitsandbytes reads absmax as fp32) beside
    bfloat16 norms: the block is held widened (float32), each norm keeps bfloat16 on the
    device, and its updates are rounded to bfloat16 as resident ones are. Everything
    trained (scales and norms), offloaded equals resident bit for bit."""
    runs = []
    for offload in (None, OffloadConfig(enabled=True, ring=1)):
        engine = ZOEngine(quantized(tmp_path, dtype=torch.bfloat16),
                          OptimConfig(lr=1e-2, method=method),
                          Objective("label_words", candidates=LABELS), seed=3,
                          total_steps=8, offload=offload)
        losses = [engine.step(make_batch(seed=i)).losses for i in range(4)]
        runs.append((losses, engine.export_state_dict(), engine))
    (la, wa, resident), (lb, wb, offloaded) = runs
    assert la == lb
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)
    norms = [k for k in wa if k.endswith("layernorm.weight") and ".layers." in k]
    assert norms and all(wb[k].dtype == torch.bfloat16 for k in norms)
    start = dict(quantized(tmp_path, dtype=torch.bfloat16).state_dict())
    assert any(not torch.equal(wb[k], start[k]) for k in norms)  # the norms were trained
    blocks = offloaded.residency.blocks
    assert blocks and all(b.host.dtype == torch.float32 and b.narrowed for b in blocks)
    assert {e.dtype for b in blocks for e in b.narrowed} == {torch.bfloat16}


@pytest.mark.parametrize("change,match", [
    ({"rounding": "stochastic"}, r"optim\.rounding=stochastic.*widened"),
    ({"host_dtype": "bfloat16"}, r"offload\.host_dtype.*float32 parameters")])
def test_a_widened_block_refuses_what_it_cannot_do_exactly(tmp_path, change, match):
    """Stochastic rounding (resident draws its own bits) and a 16-bit host copy (it
    would round the float32 scales) are refused with the cause, before any step."""
    optim = OptimConfig(lr=1e-3, rounding=change.get("rounding", "nearest"))
    offload = OffloadConfig(enabled=True, host_dtype=change.get("host_dtype"))
    with pytest.raises(ConfigError, match=match):
        ZOEngine(quantized(tmp_path, dtype=torch.bfloat16), optim,
                 Objective("label_words", candidates=LABELS), offload=offload)


def test_the_exported_checkpoint_loads_back_quantized_with_the_same_logits(tmp_path):
    engine = _engine(quantized(tmp_path), trainable=SCALES)
    for i in range(2):
        engine.step(make_batch(seed=i))
    folder = engine.save(tmp_path / "out")
    back = portable(AutoModelForCausalLM.from_pretrained(folder, device_map="cpu",
                                                         dtype=torch.float32))
    assert list(scales(back))  # quantized again, by its own config
    ids = make_batch(seed=9)["input_ids"]
    with torch.no_grad():
        want = engine.model(input_ids=ids).logits
        assert torch.equal(back(input_ids=ids).logits, want)
    # dequantized: plain float32 weights scale * code, the values bitsandbytes' forward
    # computes with, so the same logits
    plain = export_checkpoint(folder, tmp_path / "plain", dequantize="float32")
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    assert not list(scales(model)) and all(p.is_floating_point() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_double_quantized_statistics_are_read_as_float_scales(tmp_path):
    model = quantized(tmp_path, double=True)
    ids = make_batch(seed=1)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = list(scales(model))  # normalises: absmax dequantized to float32
    assert all(s.dtype == torch.float32 and not m.weight.quant_state.nested
               for _, s, m in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_lora_over_a_frozen_4bit_base(tmp_path):
    base = quantized(tmp_path)
    codes, frozen = _codes(base), {n: s.data.clone() for n, s, _ in scales(base)}
    model, trainable = wrap(base, AdapterConfig(kind="lora", r=4,
                                                target_modules=["q_proj", "v_proj"]))
    engine = _engine(model, trainable=trainable, lr=1e-2, eps=1e-2)
    assert engine.params and all("lora_" in p.name for p in engine.params)
    before = {p.name: p.param.data.clone() for p in engine.params}
    for i in range(3):
        engine.step(make_batch(seed=i))
    engine.flush()
    assert any(not torch.equal(before[p.name], p.param.data) for p in engine.params)
    def base_name(name: str) -> str:  # peft's name of a wrapped layer's weight
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    assert all(torch.equal(codes[base_name(n)], p)
               for n, p in model.named_parameters() if not p.is_floating_point())
    now = {base_name(n): s.data for n, s, _ in scales(model)}
    assert all(torch.equal(now[n], frozen[n]) for n in frozen)


def test_settings_that_cannot_work_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.quantization"):
        ModelConfig(quantization="int4").check()
    with pytest.raises(ConfigError, match="optim.clip_grad"):
        OptimConfig(clip_grad=-1.0).check()
    other = make_model("llama")
    other.config.quantization_config = {"quant_method": "awq"}
    with pytest.raises(ConfigError, match="quantized with awq, which zo2 cannot train"):
        check_supported(other)
    with pytest.raises(ConfigError, match="the disk tier does not take"):
        ZOEngine(quantized(tmp_path), OptimConfig(), Objective("label_words",
                 candidates=LABELS), offload=OffloadConfig(enabled=True,
                                                           disk_dir=str(tmp_path / "disk")))


def _in_mapped_checkpoint(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory lies in a mapped ``.safetensors`` file (Linux maps)."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and ".safetensors" in " ".join(fields[5:]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's maps")
def test_a_quantized_load_keeps_no_float_tensor_in_the_checkpoints_mapping():
    # safetensors returns a tensor read in its stored dtype as a view of the mapped file;
    # a quantized model's few float tensors then kept the whole checkpoint mapped
    # (zo2.host_memory). Its float tensors own their memory; the tied head stays tied.
    from zo2.models import load_model

    model, _ = load_model("tiny-llama", quantization="nf4")
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert floats and not any(_in_mapped_checkpoint(t) for t in floats)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_unmapped_quantizing_load_equals_transformers_own(tmp_path, fmt):
    # zo2 feeds transformers the checkpoint as pread slices (zo2.host_memory
    # .unmapped_checkpoint), so no page of the float file stays resident; the model is
    # the one transformers' own mapped read gives, bit for bit
    from zo2.models import load_model

    own = quantized(tmp_path, fmt)
    load_model("tiny-llama")[1].save_pretrained(tmp_path / "base-llama")  # a tokenizer
    ours, _ = load_model(str(tmp_path / "base-llama"), quantization=fmt)
    want, got = own.state_dict(), ours.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=batch["input_ids"]).logits,
                           own(input_ids=batch["input_ids"]).logits)
