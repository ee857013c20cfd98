"""Is torchao's weight-only quantization worth a second QZO provider? (issue 18)

Evaluates, on the CPU, torchao's weight-only configs against zo2's bitsandbytes path:

1. which configs quantize and run a forward (tiny random Llama, fp32 and bf16; the exact
   error for each failure);
2. where each working config keeps its scales (tensor-subclass attributes, dtype,
   shape, block size), whether the codes are frozen integers, and whether a scale
   replaced by an ``nn.Parameter`` can be pointed at perturbed values and back the way
   zo2's engine does it (``p.data = buf`` ... ``p.data = master``): the output must
   change and come back bit-exactly; then whether ``torch.save`` and transformers'
   ``TorchAoConfig`` + ``save_pretrained`` round-trip modified scales;
3. on SmolLM2-135M: the forward time of a 16 x 64 batch (median), the bytes of the
   model's tensors (parameters + buffers, subclass internals counted, tied tensors
   once) and the relative error of the dequantized weights vs fp32, for fp32, bf16,
   bitsandbytes nf4 and each torchao config that works.

Needs torchao (not a zo2 dependency; measured with ``pip install torchao==0.18.0``).
Run: ``python -m bench.torchao_eval [--quick]``; prints a table, writes
``bench/results/torchao_eval.json``. ``--quick`` skips SmolLM2 (tiny model only).
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
for _name in ("torchao", "bitsandbytes"):  # bnb int8 logs a warning per matmul on CPU
    logging.getLogger(_name).setLevel(logging.ERROR)

RESULTS = Path(__file__).resolve().parent / "results" / "torchao_eval.json"
BATCH, SEQ, RUNS = 16, 64, 3
LAYER = "model.layers.0.self_attn.q_proj"  # the layer whose dequantization error is shown


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:400]}"


# --------------------------------------------------------------------------- configs


def torchao_configs(group: int = 64) -> dict:
    """name -> (factory of the torchao config, note); ``group``: the group size."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup, PerRow

    int4, grouped = torch.int4, PerGroup(group)
    table = [  # name, config class, its arguments
        ("int8_wo_row", Int8WeightOnlyConfig, {"granularity": PerRow()}),
        ("int8_wo_group", Int8WeightOnlyConfig, {"granularity": grouped}),
        ("int4_wo_plain", Int4WeightOnlyConfig, {"group_size": group}),
        ("int4_wo_tile", Int4WeightOnlyConfig,
         {"group_size": group, "int4_packing_format": "tile_packed_to_4d"}),
        ("int4_wo_int32", Int4WeightOnlyConfig,
         {"group_size": group, "int4_packing_format": "plain_int32"}),
        ("intx4_wo_group", IntxWeightOnlyConfig, {"weight_dtype": int4, "granularity": grouped}),
        ("intx4_wo_group_kleidiai", IntxWeightOnlyConfig,
         {"weight_dtype": int4, "granularity": grouped,
          "intx_packing_format": "opaque_aten_kleidiai"}),
        ("intx4_wo_group_torchao_auto", IntxWeightOnlyConfig,
         {"weight_dtype": int4, "granularity": grouped,
          "intx_packing_format": "opaque_torchao_auto"}),
        ("fp8_wo_row", Float8WeightOnlyConfig, {}),
    ]
    configs = {name: (functools.partial(cls, **kwargs), _describe(cls, kwargs))
               for name, cls, kwargs in table}
    # not weight-only (int8 dynamic activations): the only configs with packed int4 CPU
    # kernels (opaque formats); in the support matrix only
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig as Dyn

    for fmt in ("opaque_aten_kleidiai", "opaque_torchao_auto"):
        kwargs = {"weight_dtype": int4, "weight_granularity": grouped, "intx_packing_format": fmt}
        configs[f"dyn_act_int4_{fmt}"] = (functools.partial(Dyn, **kwargs),
                                          _describe(Dyn, kwargs) + " (not weight-only)")
    return configs


def _describe(cls, kwargs: dict) -> str:
    """``Class(key=value, ...)``: the config as it was built."""
    return f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def decoder_linear(module: nn.Module, fqn: str) -> bool:
    """Quantize the decoder's linears only (lm_head stays, as bitsandbytes leaves it)."""
    return isinstance(module, nn.Linear) and "lm_head" not in fqn


def quantize(model: nn.Module, config) -> nn.Module:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=decoder_linear)
    return model


# --------------------------------------------------------------------------- helpers


def tiny_llama(dtype=torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def is_ao(t) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def inner_tensors(t: torch.Tensor, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The plain tensors a (possibly nested) tensor subclass is made of."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            out += inner_tensors(getattr(t, n), f"{prefix}{n}.")
        return out
    return [(prefix.rstrip("."), t)]


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (subclass internals and bitsandbytes'
    quant_state / SCB counted, each storage once)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        for _, x in inner_tensors(t):
            if x.device.type == "meta":
                continue
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.numel(), x.dtype)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():  # bitsandbytes keeps the scales outside parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and isinstance(qs.absmax, torch.Tensor):
            add(qs.absmax)
            if getattr(qs, "code", None) is not None:
                add(qs.code)
        for scb in (
            getattr(getattr(m, "state", None), "SCB", None),
            getattr(getattr(m, "weight", None), "SCB", None),
        ):
            if isinstance(scb, torch.Tensor):
                add(scb)
    return total


def dequantized(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if is_ao(w):
        return w.dequantize().float()
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as F

        return F.dequantize_4bit(w.data, qs).float()
    state = getattr(module, "state", None)
    if state is not None and hasattr(state, "SCB"):  # bitsandbytes int8: CB * SCB / 127
        cb = state.CB if state.CB is not None else w.data
        scb = state.SCB if state.SCB is not None else w.SCB
        return cb.float() * scb.float().unsqueeze(1) / 127
    return w.detach().float()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def ao_linears(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and is_ao(m.weight):
            yield name, m


def describe(module: nn.Module) -> dict:
    """Where a quantized layer's scales and codes live."""
    w = module.weight
    names, attrs = w.__tensor_flatten__()
    inner = {}
    for n in names:
        t = getattr(w, n)
        inner[n] = {
            "dtype": str(t.dtype),
            "shape": list(t.shape),
            "is_floating_point": t.is_floating_point(),
            "requires_grad": t.requires_grad,
            "type": type(t).__name__,
        }
    out = {
        "weight_type": f"{type(w).__module__}.{type(w).__name__}",
        "weight_is_nn_Parameter": isinstance(w, nn.Parameter),
        "weight_reported_dtype": str(w.dtype),
        "weight_is_floating_point": w.is_floating_point(),
        "weight_shape": list(w.shape),
        "inner_tensors": inner,
        "block_size": list(getattr(w, "block_size", []) or []),
        "scale_path": "<linear>.weight.scale",
        "code_range": [float(w.qdata.float().min()), float(w.qdata.float().max())],
    }
    if getattr(w, "zero_point", None) is not None:
        out["zero_point_all_zero"] = bool((w.zero_point == 0).all())
    # zo2's engine would treat the weight as a plain float parameter (is_floating_point):
    # can the perturbation arithmetic run on it at all?
    try:
        _ = torch.empty_like(w).normal_()
        out["randn_like_on_weight"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["randn_like_on_weight"] = _err(e)
    try:
        _ = w + 1e-3
        out["add_on_weight"] = f"ok ({type(_).__name__})"
    except Exception as e:  # noqa: BLE001
        out["add_on_weight"] = _err(e)
    return out


def make_scales_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What a provider would do: each layer's ``weight.scale`` becomes an nn.Parameter
    (same values, its dtype kept) in the place torchao reads it from."""
    out = []
    for name, m in ao_linears(model):
        w = m.weight
        if not isinstance(w.scale, nn.Parameter):
            w.scale = nn.Parameter(w.scale.detach().clone(), requires_grad=False)
        out.append((f"{name}.weight.scale", w.scale))
    return out


def perturb_restore(model: nn.Module, ids: torch.Tensor) -> dict:
    """Point every scale at ``s0 + eps*z`` (a scratch tensor) and back, as zo2's engine
    does, and check that the output changes and comes back bit-exactly; the codes must
    be untouched."""
    res = {}
    with torch.no_grad():
        y0 = model(ids).logits.clone()
        codes0 = {n: m.weight.qdata.clone() for n, m in ao_linears(model)}
        scales = make_scales_trainable(model)
        y1 = model(ids).logits
        res["same_output_after_wrapping_scale_in_Parameter"] = torch.equal(y0, y1)
        g = torch.Generator().manual_seed(1)
        masters = []
        for _, p in scales:
            master = p.data
            z = torch.randn(master.shape, generator=g).to(master.dtype)
            buf = master + 1e-2 * master.abs() * z  # a relative perturbation of 1%
            masters.append(master)
            p.data = buf
        y2 = model(ids).logits
        res["output_changes_when_perturbed"] = not torch.equal(y0, y2)
        res["max_abs_logit_change_perturbed"] = float((y2 - y0).abs().max())
        for (_, p), master in zip(scales, masters):
            p.data = master
        y3 = model(ids).logits
        res["bit_exact_after_restore"] = torch.equal(y0, y3)
        res["codes_unchanged"] = all(
            torch.equal(codes0[n], m.weight.qdata) for n, m in ao_linears(model)
        )
        # does the Parameter a provider hands out survive what moves a weight around?
        # (nn.Module.to(device) rebuilds the weight through _apply, as clone does here)
        layer = next(ao_linears(model))[1]
        for key, fn in (
            ("deepcopy", lambda: copy.deepcopy(layer).weight),
            ("module_apply_clone", lambda: copy.deepcopy(layer)._apply(lambda t: t.clone()).weight),
            ("weight_clone", lambda: layer.weight.clone()),
        ):
            try:
                res[f"scale_after_{key}"] = type(fn().scale).__name__
            except Exception as e:  # noqa: BLE001
                res[f"scale_after_{key}"] = _err(e)
        res["n_scales"] = len(scales)
        res["scale_elements"] = sum(p.numel() for _, p in scales)
        # a trained update in place: the output must follow it
        for _, p in scales:
            p.data.mul_(1.01)
        y4 = model(ids).logits
        res["output_follows_in_place_update"] = not torch.equal(y0, y4)
        for _, p in scales:
            p.data.div_(1.01)
    return res


def saved_roundtrip(model_q: nn.Module, fresh_q, ids: torch.Tensor) -> dict:
    """torch.save of a state dict with modified (Parameter) scales, loaded into a freshly
    quantized model with torch.load(weights_only=True)."""
    res = {}
    with torch.no_grad():
        scales = make_scales_trainable(model_q)
        for _, p in scales:
            p.data.mul_(1.05)
        y = model_q(ids).logits
        res["modified_scales_change_output"] = not torch.equal(y, fresh_q()(ids).logits)
        buf = io.BytesIO()
        try:
            torch.save(model_q.state_dict(), buf)
            res["torch_save_bytes"] = buf.tell()
            buf.seek(0)
            sd = torch.load(buf, weights_only=True)
            m2 = fresh_q()
            m2.load_state_dict(sd, assign=True)
            y2 = m2(ids).logits
            res["torch_save_load_bit_exact"] = torch.equal(y, y2)
            res["loaded_scale_type"] = type(
                m2.model.layers[0].self_attn.q_proj.weight.scale
            ).__name__
        except Exception as e:  # noqa: BLE001
            res["torch_save_load_error"] = _err(e)
        try:  # state dict loaded in place (copy_ into an existing quantized model)
            buf.seek(0)
            sd = torch.load(buf, weights_only=True)
            m3 = fresh_q()
            m3.load_state_dict(sd)
            res["load_state_dict_copy_bit_exact"] = torch.equal(y, m3(ids).logits)
        except Exception as e:  # noqa: BLE001
            res["load_state_dict_copy_error"] = _err(e)
    return res


def transformers_roundtrip(cfg_factory, ids: torch.Tensor) -> dict:
    """TorchAoConfig load -> scales modified -> save_pretrained -> from_pretrained."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    res = {}
    with tempfile.TemporaryDirectory(prefix="zo2_torchao_") as d:
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        tiny_llama().save_pretrained(src)
        try:
            m = AutoModelForCausalLM.from_pretrained(
                src, quantization_config=TorchAoConfig(cfg_factory()), dtype=torch.float32
            )
            m.eval()
            res["from_pretrained_weight_type"] = type(
                m.model.layers[0].self_attn.q_proj.weight
            ).__name__
        except Exception as e:  # noqa: BLE001
            res["from_pretrained_error"] = _err(e)
            return res
        with torch.no_grad():
            for _, p in make_scales_trainable(m):
                p.data.mul_(1.05)
            y = m(ids).logits
        for safe in (True, False):
            key = "safetensors" if safe else "pickle"
            out = f"{dst}_{key}"
            try:
                m.save_pretrained(out, safe_serialization=safe)
            except TypeError:  # a transformers without the keyword
                if not safe:
                    res[f"save_{key}"] = "no safe_serialization keyword"
                    continue
                m.save_pretrained(out)
            except Exception as e:  # noqa: BLE001
                res[f"save_{key}_error"] = _err(e)
                continue
            res[f"save_{key}_files"] = sorted(os.listdir(out))
            try:
                m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                with torch.no_grad():
                    y2 = m2(ids).logits
                w2 = m2.model.layers[0].self_attn.q_proj.weight
                res[f"reload_{key}_weight_type"] = type(w2).__name__
                res[f"reload_{key}_bit_exact"] = torch.equal(y, y2)
            except Exception as e:  # noqa: BLE001
                res[f"reload_{key}_error"] = _err(e)
    return res


# --------------------------------------------------------------------------- stages


def support_matrix(configs: dict) -> dict:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = tiny_llama(dtype)
        for name, (factory, note) in configs.items():
            key = f"{name}@{str(dtype).split('.')[-1]}"
            row = {"config": note}
            try:
                m = quantize(copy.deepcopy(base), factory())
                row["quantize"] = "ok"
                row["weight_type"] = type(m.model.layers[0].self_attn.q_proj.weight).__name__
                with torch.no_grad():
                    m(ids)
                row["forward"] = "ok"
            except Exception as e:  # noqa: BLE001
                row.setdefault("quantize", _err(e))
                if row["quantize"] == "ok":
                    row["forward"] = _err(e)
            out[key] = row
    return out


def tiny_checks(configs: dict, working: list[str]) -> dict:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    base = tiny_llama()
    for name in working:
        factory = configs[name][0]
        row = {}
        fresh = lambda factory=factory: quantize(copy.deepcopy(base), factory())  # noqa: E731
        try:
            m = fresh()
            row["layout"] = describe(m.model.layers[0].self_attn.q_proj)
            row["perturb_restore"] = perturb_restore(m, ids)
            row["torch_save"] = saved_roundtrip(fresh(), fresh, ids)
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            traceback.print_exc()
        try:
            row["transformers"] = transformers_roundtrip(factory, ids)
        except Exception as e:  # noqa: BLE001
            row["transformers_error"] = _err(e)
        out[name] = row
    return out


def time_forward(model: nn.Module, ids: torch.Tensor) -> list[float]:
    times = []
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(RUNS):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return times


def smollm(configs: dict, working: list[str]) -> dict:
    from zo2.models import load_model

    out = {}
    t = time.perf_counter()
    ref, tok = load_model("smollm2-135m")
    ref.eval()
    out["load_s"] = round(time.perf_counter() - t, 1)
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    small = ids[:2, :16]
    ref_w = {
        n: m.weight.detach().float().clone()
        for n, m in ref.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in n
    }
    with torch.no_grad():
        ref_logits = ref(small).logits.float()

    def measure(label: str, model: nn.Module, extra: dict | None = None) -> None:
        row = dict(extra or {})
        try:
            row["tensor_bytes"] = tensor_bytes(model)
            mods = dict(model.named_modules())
            row["decoder_linear_bytes"] = sum(tensor_bytes(mods[n]) for n in ref_w)
            row["rel_err_" + LAYER] = rel_err(dequantized(mods[LAYER]), ref_w[LAYER])
            num = den = 0.0
            for n, w in ref_w.items():
                num += float((dequantized(mods[n]) - w).pow(2).sum())
                den += float(w.pow(2).sum())
            row["rel_err_all_decoder_linears"] = (num / den) ** 0.5
            with torch.no_grad():
                row["rel_err_logits_2x16"] = rel_err(model(small).logits.float(), ref_logits)
            times = time_forward(model, ids)
            row["forward_s_runs"] = [round(x, 3) for x in times]
            row["forward_s_median"] = round(statistics.median(times), 3)
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            traceback.print_exc()
        out[label] = row
        print(
            f"  {label}: {row.get('forward_s_median')} s, {row.get('tensor_bytes')} B", flush=True
        )

    measure("fp32", ref)
    measure("bf16", copy.deepcopy(ref).to(torch.bfloat16))
    try:
        nf4, _ = load_model("smollm2-135m", quantization="nf4")
        from zo2.quantized import portable

        measure("bnb_nf4", portable(nf4.eval()))
        del nf4
    except Exception as e:  # noqa: BLE001
        out["bnb_nf4"] = {"error": _err(e)}
    try:
        int8, _ = load_model("smollm2-135m", quantization="int8")
        measure("bnb_int8", int8.eval())
        del int8
    except Exception as e:  # noqa: BLE001
        out["bnb_int8"] = {"error": _err(e)}
    for name in working:
        factory = configs[name][0]
        t = time.perf_counter()
        try:
            m = quantize(copy.deepcopy(ref), factory())
        except Exception as e:  # noqa: BLE001
            out[f"torchao_{name}"] = {"error": _err(e)}
            continue
        qs = round(time.perf_counter() - t, 2)
        layout = describe(dict(m.named_modules())[LAYER])
        measure(f"torchao_{name}", m, {"quantize_s": qs, "layout": layout})
        try:
            out[f"torchao_{name}"]["perturb_restore"] = perturb_restore(m, small)
        except Exception as e:  # noqa: BLE001
            out[f"torchao_{name}"]["perturb_restore"] = {"error": _err(e)}
        del m
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only (no SmolLM2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    import torchao
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    result = {
        "versions": {
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "threads": torch.get_num_threads(),
        "batch": [BATCH, SEQ],
        "runs": RUNS,
    }
    try:
        import bitsandbytes

        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    configs = torchao_configs(32)  # hidden 64: two groups per row
    result["group_size"] = {"tiny": 32, "smollm2_135m": 64}
    print("== support matrix (tiny Llama)", flush=True)
    result["support"] = support_matrix(configs)
    for k, v in result["support"].items():
        print(f"  {k:34s} quantize={v['quantize'][:90]} forward={v.get('forward', '-')[:60]}")
    working = [
        n
        for n in configs
        if result["support"][f"{n}@float32"].get("forward") == "ok" and not n.startswith("dyn_")
    ]
    result["working_fp32"] = working
    print("== scales, perturb/restore, save/load (tiny Llama):", working, flush=True)
    result["tiny"] = tiny_checks(configs, working)
    for n, row in result["tiny"].items():
        print(f"  {n}: {json.dumps(row.get('perturb_restore'))}")
        print(f"    torch_save: {json.dumps(row.get('torch_save'))}")
        print(
            f"    transformers: {json.dumps(row.get('transformers', row.get('transformers_error')))}"  # noqa: E501
        )
    if not args.quick:
        print(f"== SmolLM2-135M, forward {BATCH}x{SEQ}, median of {RUNS}", flush=True)
        result["smollm2_135m"] = smollm(torchao_configs(64), working)
        print(
            f"\n{'model':24s} {'fwd s':>7s} {'MiB':>8s} {'lin MiB':>8s} {'err q_proj':>11s} "
            f"{'err all':>9s} {'err logits':>11s}"
        )
        for label, row in result["smollm2_135m"].items():
            if not isinstance(row, dict):
                continue
            if "error" in row:
                print(f"{label:24s} ERROR {row['error']}")
                continue
            print(
                f"{label:24s} {row['forward_s_median']:7.3f} "
                f"{row['tensor_bytes'] / 2**20:8.1f} {row['decoder_linear_bytes'] / 2**20:8.1f} "
                f"{row['rel_err_' + LAYER]:11.2e} "
                f"{row['rel_err_all_decoder_linears']:9.2e} {row['rel_err_logits_2x16']:11.2e}"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
