"""ZO2's memory table on one GPU: peak GPU memory and throughput, offloaded vs resident.

Replicates the ZO2 paper's table at the public OPT shapes (random weights, fp16,
``tie_word_embeddings=False``, vocab 50272, 2048 positions): 1.3b, 6.7b, 13b, 30b
(2.7b on request), batch 1 x 2048 tokens, MeZO classification loss (label words at the
last position), two-sided SPSA. For each size two runs, each in a fresh engine:

* ``offload``: ``OffloadConfig(enabled=True, ring=2, layers_only=True)``: decoder
  layers in pinned host memory, streamed through a ring of 2 GPU buffers;
  embeddings, final norm and LM head resident on the GPU;
* ``resident``: the whole model on the GPU (skipped when it would not fit).

A run takes ``--steps`` steps (default 6). Peak GPU memory is the maximum over the steps
of each step's ``gpu_peak_allocated_gb`` telemetry (the peak since the previous step; the
counter is reset after the engine is built), and of ``torch.cuda.max_memory_allocated()``
after the last step; a step's time is wall time between ``torch.cuda.synchronize()``
calls; ``tok_s = tokens / mean step time over the last half of the steps``. The transfer
figures are the telemetry of the last step. The PCIe lower bound of an offloaded step is
``max(up_bytes / H2D, down_bytes / D2H)`` (the bus is full duplex; ``pcie_serial_s`` is
the sum), with the bytes every block crosses per step and H2D / D2H measured once with
a 1 GiB pinned tensor.

An offloaded step can be no faster than the transfers and no faster than the same step
resident, so ``step_over_bound = step_s / max(pcie_bound_s, resident_step_s)`` is the
figure of merit (1.0 is the physical limit; resident missing: the PCIe bound alone). At
1 x 2048 tokens an OPT layer does about 4,096 FLOP per uploaded byte (two forwards of 2
FLOP per parameter per token, 2 bytes per fp16 parameter), well below an H200's balance
of compute and PCIe (about 15,800), so the transfers dominate and ``tok_s`` offloaded
cannot reach 0.9 of resident there. The ``balance`` stage therefore also runs the
smallest measured size at the token count where the two balance: the resident step time
grows with the tokens and the transfers do not, so ``tokens* = seq * pcie_bound_s /
resident_step_s``, rounded up to whole sequences of ``seq`` (batch ``ceil(tokens*/seq)``).

``table_from_configs`` is ZO2's memory table computed from the OPT configs alone (no run):
parameters, fp16 bytes, the largest layer, and the offloaded device floor
``non-layer bytes + ring x largest layer`` (activations come on top), for every size.

Models are built fast: the model is created on ``meta`` in fp16 and each parameter is
generated on the GPU (``normal_(0, 0.02)``; LayerNorm weights 1, biases 0) when the
engine asks for it (``ZOEngine(weights=...)``), so an offloaded layer goes straight
from the GPU into its pinned host block: peak host memory is the pinned blocks plus one
parameter. (``--materialize manual``: every parameter generated on the GPU and, for the
offloaded run, moved to the CPU before the engine is built; for a library without
``weights=``.)

Time budget (default 8 minutes in all, ``--budget-s``): before each run its time is
estimated from the last run of that mode (scaled by model size, x1.3) and the run is
skipped, and recorded as skipped, when it would not finish in time; a run past the
budget stops after its second step. Runs that fail (out of memory, ...) are recorded
with their error and the next size runs.

4-bit (``--quantization nf4|fp4``, issue 18's GPU row): the same sizes with every linear
layer of the decoder layers quantized by bitsandbytes (``Linear4bit``, no double
quantization, fp16 compute), as zo2's ``model.quantization=nf4`` loads them; embeddings,
norms, biases and LM head stay fp16. A decoder layer's block is then held widened
(float32: its fp32 ``absmax`` scales beside fp16 norms and biases; see
:mod:`zo2.offload.store`), so its float lane crosses the bus in float32, small beside
the codes. The model cannot stay on ``meta`` (bitsandbytes quantizes real values):
each layer's weights are generated on the GPU, quantized there, and (for the offloaded
run) moved to the host before the engine is built; the host then holds the 4-bit model
(about 0.28x the fp16 bytes). The engine trains what zo2 trains on a
quantized base: the 4-bit layers' scales (``absmax``) and the float parameters. Bytes
per step are the blocks' float lane plus their codes lane. Results go to
``gpu_offload-<gpu>-<format>.json``: compare its ``peak_gb`` / ``step_s`` /
``bytes_per_step_gb`` with the fp16 file's.

Targets: ``peak_gb_offload <= zo2_paper_gb`` (1.3b 3.75, 2.7b 4.14, 6.7b 4.99, 13b 6.18,
30b 8.86 GB) and ``step_over_bound`` near 1.0 (``offload_over_resident_throughput`` is
reported too; >= 0.9 is out of reach at 1 x 2048 tokens, see above).

    python -m bench.gpu_offload [--sizes 1.3b,6.7b,13b,30b] [--steps 6] [--budget-s 480]
    python -m bench.gpu_offload --dry-run      # same code path on the CPU, tiny shapes
    python -m bench.gpu_offload --quantization nf4 [--dry-run]   # the 4-bit row

Writes ``<--results>/gpu_offload-<gpu name>.json`` (default ``bench/results``;
``gpu_offload-dry-run-cpu.json`` with ``--dry-run``). Last line: ``gpu=... h2d_gbps=...
d2h_gbps=...`` then per size ``<size>_peak_gb=... <size>_paper_gb=...
<size>_resident_peak_gb=... <size>_tok_s=... <size>_resident_tok_s=... <size>_ratio=...
<size>_step_s=... <size>_pcie_bound_s=... <size>_step_over_bound=...``, then
``balance_size=... balance_batch=... balance_ratio=... balance_step_over_bound=...`` and
``elapsed_s=... skipped=...``.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import RESULTS, classification_batch, report  # noqa: E402
from zo2 import Objective, OptimConfig, ZOEngine  # noqa: E402
from zo2.config import OffloadConfig  # noqa: E402
from zo2.offload.store import host_available_bytes  # noqa: E402

LABELS = (5, 9)
VOCAB = 50272
SHAPES = {  # hidden, layers, heads, ffn of the public OPT models
    "tiny": (64, 2, 4, 256),
    "1.3b": (2048, 24, 32, 8192),
    "2.7b": (2560, 32, 32, 10240),
    "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672),
}
PAPER_GB = {"1.3b": 3.75, "2.7b": 4.14, "6.7b": 4.99, "13b": 6.18, "30b": 8.86}
TARGETS = {"peak_gb_offload": "<= zo2_paper_gb",
           "step_over_bound": "step_s / max(pcie_bound_s, resident_step_s): 1.0 is the limit"}
Q4_BYTES = 0.5 + 4 / 64  # a 4-bit weight: half a byte of code, an fp32 absmax per 64
GUESS_S_PER_GB = {"offload": 1.5, "resident": 0.5}  # before any run of the mode finished


# ---- models -----------------------------------------------------------------------------
def opt_config(size: str):
    from transformers import OPTConfig

    hidden, layers, heads, ffn = SHAPES[size]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                       num_attention_heads=heads, vocab_size=VOCAB,
                       max_position_embeddings=2048, word_embed_proj_dim=hidden,
                       do_layer_norm_before=True, tie_word_embeddings=False)
    config.use_cache = False
    return config


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on ``meta`` (no storage), in ``dtype``."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(config)
    model = model.to(dtype).eval().requires_grad_(False)
    on_meta = [n for n, b in model.named_buffers() if b.is_meta]
    if on_meta:  # OPT has none; another architecture would need them computed
        raise RuntimeError(f"buffers left on meta, cannot be generated: {on_meta[:4]}")
    return model


class RandomWeights:
    """``name -> tensor``: a fresh random value for a parameter, generated on ``device``.

    Matrices and embeddings ``N(0, 0.02)``, LayerNorm weights 1, other vectors
    (biases, LayerNorm biases) 0: finite losses at every depth in fp16.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        ones = {f"{m}.weight".lstrip(".") for m, mod in model.named_modules()
                if isinstance(mod, nn.LayerNorm)}
        self.specs = {n: (p.shape, "one" if n in ones else "zero" if p.dim() < 2 else "normal")
                      for n, p in model.named_parameters()}
        self.device, self.dtype = device, dtype

    def __call__(self, name: str) -> torch.Tensor:
        shape, kind = self.specs[name]
        t = torch.empty(shape, dtype=self.dtype, device=self.device)
        return t.fill_(1) if kind == "one" else t.zero_() if kind == "zero" else t.normal_(0, 0.02)

    def bytes_by_layer(self, layers_prefix: str) -> tuple[list[int], int]:
        """(bytes of each decoder layer, bytes of everything else)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        layers: dict[str, int] = {}
        other = 0
        for name, (shape, _) in self.specs.items():
            nbytes = shape.numel() * size
            if name.startswith(layers_prefix):
                key = name[len(layers_prefix):].split(".")[0]
                layers[key] = layers.get(key, 0) + nbytes
            else:
                other += nbytes
        return list(layers.values()), other


def materialize_manual(model: nn.Module, weights: RandomWeights, to_cpu: bool) -> None:
    """Give every parameter its random value (moved to the CPU when ``to_cpu``)."""
    for name, param in list(model.named_parameters()):
        value = weights(name)
        torch.utils.swap_tensors(param, nn.Parameter(value.cpu() if to_cpu else value,
                                                     requires_grad=False))


def materialize_quantized(model: nn.Module, weights: RandomWeights, fmt: str,
                          compute: torch.dtype, dev: torch.device, to_cpu: bool,
                          layers_prefix: str) -> int:
    """Give every parameter its random value, the linear layers under ``layers_prefix``
    quantized to ``fmt`` (bitsandbytes ``Linear4bit`` computing in ``compute``, quantized
    on ``dev``); moved to the CPU when ``to_cpu``. Returns the number of layers
    quantized."""
    import bitsandbytes as bnb

    quantized = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}".lstrip(".")
            if not (isinstance(child, nn.Linear) and name.startswith(layers_prefix)):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=compute,
                                      compress_statistics=False, quant_type=fmt, device="meta")
            layer.weight = bnb.nn.Params4bit(weights(f"{name}.weight"), requires_grad=False,
                                             compress_statistics=False,
                                             quant_type=fmt).to(dev)  # quantizes
            if child.bias is not None:
                layer.bias = nn.Parameter(weights(f"{name}.bias"), requires_grad=False)
            setattr(parent, child_name, layer.to("cpu") if to_cpu else layer)
            quantized += 1
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # the rest: embeddings, norms, head (the 4-bit layers' are not)
            value = weights(name)
            torch.utils.swap_tensors(param, nn.Parameter(value.cpu() if to_cpu else value,
                                                         requires_grad=False))
    return quantized


# ---- device helpers (stubs on the CPU) ----------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type != "cuda":
        return
    torch.cuda.empty_cache()
    empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty_host = empty_host or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:  # pinned blocks go back to the OS, not to torch's cache
        empty_host()


def pinned_gb(dev: torch.device) -> float | None:
    """Pinned host memory torch's host allocator holds (its blocks are powers of two)."""
    if dev.type != "cuda":
        return None
    try:
        return torch.cuda.host_memory_stats()["allocated_bytes.current"] / 1e9
    except Exception:  # older torch: no host allocator statistics
        return None


def pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def bandwidth_gbps(dev: torch.device) -> tuple[float | None, float | None]:
    """(H2D, D2H) GB/s of a 1 GiB pinned tensor copy (median of 5); None on the CPU."""
    if dev.type != "cuda":
        return None, None
    n = 2**30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(n, dtype=torch.uint8, device=dev)
    rates = {}
    for name, dst, src in (("h2d", device, host), ("d2h", host, device)):
        dst.copy_(src, non_blocking=True)
        sync(dev)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            sync(dev)
            times.append(time.perf_counter() - start)
        rates[name] = n / statistics.median(times) / 1e9
    del host, device
    free_memory(dev)
    return rates["h2d"], rates["d2h"]


def gpu_fits(dev: torch.device, need: int) -> tuple[bool, str]:
    if dev.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(dev)
    return need <= 0.95 * free, f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free on the GPU"


def host_fits(need: int) -> tuple[bool, str]:
    avail = host_available_bytes()
    if avail is None:
        return True, ""
    return need <= 0.92 * avail, f"needs ~{need / 1e9:.1f} GB host, {avail / 1e9:.1f} GB available"


# ---- one run ------------------------------------------------------------------------------
def run(size: str, mode: str, args, dev: torch.device, dtype: torch.dtype,
        deadline: float, batch_size: int = 1) -> dict:
    """Build a fresh engine for ``size`` (``mode``: offload | resident) and time its steps
    on ``batch_size`` x ``args.seq`` tokens."""
    config = opt_config(size)
    t0 = time.perf_counter()
    model = meta_model(config, dtype)
    weights = RandomWeights(model, dev, dtype)
    layer_bytes, other_bytes = weights.bytes_by_layer("model.decoder.layers.")
    if args.quantization != "none":  # the layers' linear weights dominate their bytes
        size = torch.empty((), dtype=dtype).element_size()
        layer_bytes = [math.ceil(b * Q4_BYTES / size) for b in layer_bytes]
    model_bytes = sum(layer_bytes) + other_bytes
    largest = max(layer_bytes + [other_bytes // 2])
    act = 6 * 2 * batch_size * args.seq * max(4 * config.hidden_size, config.ffn_dim) * 2
    if mode == "resident":
        fits, why = gpu_fits(dev, model_bytes + 2 * largest + act + 2**31)
    else:
        pinned = sum(pow2ceil(b) for b in layer_bytes) if dev.type == "cuda" else sum(layer_bytes)
        extra = model_bytes if args.materialize == "manual" else max(layer_bytes)
        fits, why = host_fits(pinned + extra)
        if fits:
            fits, why = gpu_fits(dev, other_bytes + (args.ring + 1) * largest + act + 2**31)
    record: dict = {"model_gb": model_bytes / 1e9, "layer_gb": max(layer_bytes) / 1e9,
                    "batch": batch_size}
    if not fits:
        record["skipped"] = f"does not fit: {why}"
        return record

    offload = OffloadConfig(enabled=True, ring=args.ring, layers_only=True) \
        if mode == "offload" else None
    objective = Objective("label_words", candidates=torch.tensor(LABELS))
    optim = OptimConfig(lr=1e-7, eps=1e-3)
    if args.quantization != "none":
        record["quantized_layers"] = materialize_quantized(
            model, weights, args.quantization, dtype, dev,
            to_cpu=mode == "offload" and dev.type == "cuda", layers_prefix="model.decoder.layers.")
        engine = ZOEngine(model, optim, objective, offload=offload, device=dev)
    elif args.materialize == "weights":
        engine = ZOEngine(model, optim, objective, offload=offload, device=dev, weights=weights)
    else:
        materialize_manual(model, weights, to_cpu=mode == "offload" and dev.type == "cuda")
        engine = ZOEngine(model, optim, objective, offload=offload, device=dev)
    sync(dev)
    record["build_s"] = time.perf_counter() - t0
    record["pinned_gb"] = pinned_gb(dev)
    if mode == "offload":
        record["bytes_per_step_gb"] = sum(  # every block crosses once up and once down
            b.numel * b.host.element_size() for b in engine.residency.blocks) / 1e9
        record["codes_up_per_step_gb"] = sum(  # a 4-bit block's codes: up only, never back
            b.codes_numel for b in engine.residency.blocks) / 1e9
        record["device_gb_before_steps"] = engine.residency.device_bytes() / 1e9
    free_memory(dev)  # generation temporaries
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    batch = classification_batch(batch_size, args.seq, VOCAB, LABELS)
    times, peaks, skipped_steps, result = [], [], 0, None
    for i in range(args.steps):
        if i >= 2 and time.perf_counter() > deadline:
            record["truncated"] = f"time budget: stopped after {i} steps"
            break
        sync(dev)
        start = time.perf_counter()
        result = engine.step(batch, telemetry=True)  # the peak since the previous step
        sync(dev)
        times.append(time.perf_counter() - start)
        if dev.type == "cuda":
            peaks.append(result.telemetry["gpu_peak_allocated_gb"] * 2**30 / 1e9)
        skipped_steps += int(result.skipped)
    tail = times[len(times) // 2:]
    step_s = statistics.mean(tail)
    if dev.type == "cuda":  # and anything after the last step's collection
        peaks.append(torch.cuda.max_memory_allocated(dev) / 1e9)
    record.update({
        "peak_gb": max(peaks) if dev.type == "cuda" else None, "step_peaks_gb": peaks,
        "step_s": step_s, "tok_s": batch_size * args.seq / step_s, "step_times_s": times,
        "first_step_s": times[0], "nonfinite_steps": skipped_steps, "loss": result.loss,
        "telemetry": result.telemetry, "wall_s": time.perf_counter() - t0,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    })
    alive = weakref.ref(model)
    del engine, model, weights, result
    gc.collect()
    record["model_freed"] = alive() is None  # else its pinned blocks would stay allocated
    return record


def estimate_s(size: str, mode: str, history: dict[str, list[tuple[float, float]]],
               dtype: torch.dtype) -> float:
    """Seconds a run of ``size`` will take: the last run of the mode scaled by model size."""
    hidden, layers, _, ffn = SHAPES[size]
    params = layers * (4 * hidden * hidden + 2 * hidden * ffn) + (2 * VOCAB + 2050) * hidden
    gb = params * torch.empty((), dtype=dtype).element_size() / 1e9
    if not history[mode]:
        return 10.0 + 1.3 * GUESS_S_PER_GB[mode] * gb
    last_gb, last_s = history[mode][-1]
    return 5.0 + 1.3 * last_s * max(gb / last_gb, 1.0)


# ---- the table ----------------------------------------------------------------------------
def summarize(size: str, off: dict, res: dict, h2d: float | None, d2h: float | None) -> dict:
    paper = PAPER_GB.get(size)
    out = {
        "peak_gb_offload": off.get("peak_gb"), "peak_gb_resident": res.get("peak_gb"),
        "zo2_paper_gb": paper,
        "tok_s_offload": off.get("tok_s"), "tok_s_resident": res.get("tok_s"),
        "offload_over_resident_throughput": None, "pcie_bound_s": None, "pcie_serial_s": None,
        "step_s_offload": off.get("step_s"), "step_s_resident": res.get("step_s"),
        "step_over_bound": None, "bound_s": None, "bound_is": None,
    }
    if out["tok_s_offload"] and out["tok_s_resident"]:
        out["offload_over_resident_throughput"] = out["tok_s_offload"] / out["tok_s_resident"]
    moved = off.get("bytes_per_step_gb")
    if moved is not None and h2d and d2h:
        up = moved + off.get("codes_up_per_step_gb", 0.0)
        out["pcie_bound_s"] = max(up / h2d, moved / d2h)
        out["pcie_serial_s"] = up / h2d + moved / d2h
    bounds = {k: v for k, v in (("pcie", out["pcie_bound_s"]), ("resident", res.get("step_s")))
              if v}
    if bounds and out["step_s_offload"]:
        out["bound_is"] = max(bounds, key=bounds.get)
        out["bound_s"] = bounds[out["bound_is"]]
        out["step_over_bound"] = out["step_s_offload"] / out["bound_s"]
    if out["peak_gb_offload"] is not None and paper is not None:
        out["meets_memory_target"] = out["peak_gb_offload"] <= paper
    out["offload"], out["resident"] = off, res
    return out


def short(value, status: str):
    return value if value is not None else status


def table_from_configs(sizes, ring: int, dtype: torch.dtype) -> dict[str, dict]:
    """ZO2's memory table from the OPT configs alone (meta models: no memory, no run)."""
    table = {}
    for size in sizes:
        model = meta_model(opt_config(size), dtype)
        layers, other = RandomWeights(model, torch.device("meta"), dtype).bytes_by_layer(
            "model.decoder.layers.")
        params = sum(p.numel() for p in model.parameters())
        table[size] = {
            "params_b": params / 1e9, "model_gb": (sum(layers) + other) / 1e9,
            "layers": len(layers), "largest_layer_gb": max(layers) / 1e9,
            "non_layer_gb": other / 1e9,
            "offload_device_floor_gb": (other + ring * max(layers)) / 1e9,
            "zo2_paper_gb": PAPER_GB.get(size),
        }
    return table


def time_run(size: str, mode: str, args, dev, dtype, deadline: float, history: dict,
             batch_size: int = 1) -> dict:
    """:func:`run` unless it would not finish in time; failures are recorded, not raised."""
    left = deadline - time.perf_counter()
    need = estimate_s(size, mode, history, dtype) * batch_size ** 0.5
    if need > left:
        rec = {"skipped": f"time budget: needs ~{need:.0f} s, {left:.0f} s left"}
    else:
        try:
            rec = run(size, mode, args, dev, dtype, deadline, batch_size)
        except Exception as err:  # out of memory, ...: record it, go on
            rec = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
    free_memory(dev)
    if "wall_s" in rec:
        extra = max(rec["first_step_s"] - rec["step_s"], 0.0)  # compilation
        history[mode].append((rec["model_gb"], rec["wall_s"] - extra))
    print(f"{size} {mode} batch={batch_size}: " + json.dumps(
        {k: v for k, v in rec.items() if k not in ("telemetry", "step_times_s")}), flush=True)
    return rec


def balance_batch(row: dict, seq: int) -> tuple[int, float | None]:
    """(batch, tokens*): the sequences of ``seq`` tokens at which a resident step takes
    as long as the offloaded step's transfers (``tokens* = seq * pcie / resident``)."""
    bound, resident = row.get("pcie_bound_s"), row.get("step_s_resident")
    if not bound or not resident:
        return 2, None  # the CPU (no PCIe) or no resident run: exercise the stage at 2
    tokens = seq * bound / resident
    return min(max(1, math.ceil(tokens / seq)), 16), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1.3b,6.7b,13b,30b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the whole script, from start to the result file")
    parser.add_argument("--materialize", choices=("weights", "manual"), default=None,
                        help="weights: ZOEngine(weights=...) (default where supported)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code path on the CPU: sizes tiny, seq 32")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the result file")
    parser.add_argument("--quantization", choices=("none", "nf4", "fp4"), default="none",
                        help="4-bit decoder layers (bitsandbytes), issue 18's GPU row")
    parser.add_argument("--no-balance", action="store_true",
                        help="skip the run at the compute/transfer balance point")
    args = parser.parse_args()
    if args.materialize is None:
        takes = "weights" in inspect.signature(ZOEngine.__init__).parameters
        args.materialize = "weights" if takes else "manual"
    if args.dry_run:
        dev, args.sizes, args.seq = torch.device("cpu"), "tiny", 32
        gpu = "dry-run-cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --dry-run to check the script on the CPU")
        dev = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(dev)
    if args.quantization != "none":
        import bitsandbytes  # noqa: F401  (fail now, not in every run)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    dtype = torch.float16
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown sizes {unknown}; known: {list(SHAPES)}")
    deadline = START + args.budget_s - 15.0  # leave time to write the results
    torch.manual_seed(0)

    h2d, d2h = bandwidth_gbps(dev)
    print(f"device={gpu} h2d_gbps={h2d} d2h_gbps={d2h} materialize={args.materialize}",
          flush=True)
    history: dict[str, list[tuple[float, float]]] = {"offload": [], "resident": []}
    configs = table_from_configs(SHAPES, args.ring, torch.float16)  # every size, on meta
    table: dict[str, dict] = {}
    balance = None
    for size in sizes:
        runs = {mode: time_run(size, mode, args, dev, dtype, deadline, history)
                for mode in ("offload", "resident")}
        table[size] = summarize(size, runs["offload"], runs["resident"], h2d, d2h)
        if balance is None and table[size]["step_s_offload"] and not args.no_balance:
            # right after the first measured size (the smallest): before the budget is spent
            batch, tokens = balance_batch(table[size], args.seq)
            runs = {mode: time_run(size, mode, args, dev, dtype, deadline, history, batch)
                    for mode in ("offload", "resident")}
            balance = {"size": size, "batch": batch, "tokens": batch * args.seq,
                       "balance_tokens": tokens,
                       **summarize(size, runs["offload"], runs["resident"], h2d, d2h)}

    figures: dict = {"gpu": slug, "h2d_gbps": short(h2d, "none"), "d2h_gbps": short(d2h, "none")}
    skipped = 0
    for size, row in table.items():
        off, res = row["offload"], row["resident"]
        status_off = "skipped" if "skipped" in off else "error" if "error" in off else "none"
        status_res = "skipped" if "skipped" in res else "error" if "error" in res else "none"
        skipped += int(status_off != "none") + int(status_res != "none")
        figures.update({
            f"{size}_peak_gb": short(row["peak_gb_offload"], status_off),
            f"{size}_paper_gb": short(row["zo2_paper_gb"], "none"),
            f"{size}_resident_peak_gb": short(row["peak_gb_resident"], status_res),
            f"{size}_tok_s": short(row["tok_s_offload"], status_off),
            f"{size}_resident_tok_s": short(row["tok_s_resident"], status_res),
            f"{size}_ratio": short(row["offload_over_resident_throughput"], "none"),
            f"{size}_step_s": short(row["step_s_offload"], status_off),
            f"{size}_pcie_bound_s": short(row["pcie_bound_s"], "none"),
            f"{size}_step_over_bound": short(row["step_over_bound"], "none"),
        })
    if balance is not None:
        figures.update({"balance_size": balance["size"], "balance_batch": balance["batch"],
                        "balance_ratio": short(balance["offload_over_resident_throughput"],
                                               "none"),
                        "balance_step_over_bound": short(balance["step_over_bound"], "none")})
    figures["elapsed_s"] = time.perf_counter() - START
    figures["skipped"] = skipped
    name = f"gpu_offload-{slug}" + ("" if args.quantization == "none" else f"-{args.quantization}")
    report(name, figures, folder=args.results)
    path = args.results / f"{name}.json"
    record = json.loads(path.read_text())
    record.update({"gpu": gpu, "targets": TARGETS, "h2d_gbps": h2d, "d2h_gbps": d2h,
                   "settings": {"batch": 1, "seq": args.seq, "steps": args.steps,
                                "ring": args.ring, "layers_only": True, "dtype": str(dtype),
                                "budget_s": args.budget_s, "materialize": args.materialize,
                                "lr": 1e-7, "eps": 1e-3, "objective": "label_words",
                                "quantization": args.quantization},
                   "table_from_configs": configs, "sizes": table, "balance": balance})
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
