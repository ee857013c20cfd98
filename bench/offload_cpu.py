"""Step time and device memory of the offloaded ZO engine against the resident one, on the CPU.

At the OPT-125m shape (random weights, fp32), batch 8 x 128 tokens, classification
loss at the last position. Two copies of the model, one per engine: the resident
engine keeps every tensor on the device; the offloaded one (``device="cpu"``, ring of
K buffers, ``layers_only``) keeps the decoder layers in flat host buffers and streams
them through the ring, so on the CPU the "transfers" are memcpys and the ratio
measures the scheduler's bookkeeping plus one copy up and one down per layer and step.
Each engine warms up with one step; then rounds of ``--steps`` steps per engine are
interleaved so machine noise hits both alike; medians of single steps are reported.
The transfer figures are the telemetry of the offloaded engine's last (steady) step.

``device_bytes_ratio`` is the offloaded engine's ``residency.device_bytes()`` (the
resident embeddings/head, norms, ring buffers) over the bytes of every parameter and
buffer of the resident engine's model (all of the model). Target: ``offload_over_resident``
close to 1.

    python -m bench.offload_cpu [--rounds 3] [--steps 2] [--ring 2] [--ring1]

Last line: ``offload_over_resident=... device_bytes_ratio=... resident_step_s=...
offload_step_s=... offload_up_mb=... offload_down_mb=... offload_up_gbps=...
offload_wait_s=...`` (plus ``ring1_offload_over_resident=... ring1_device_bytes_ratio=...``
with ``--ring1``).
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import classification_batch, median, opt_shape, report, timed
from zo2 import Objective, OptimConfig, ZOEngine
from zo2.config import OffloadConfig
from zo2.offload.telemetry import storage_bytes

LABELS = (5, 9)


def model_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the model's parameters and buffers on ``device``, shared storage once."""
    return storage_bytes(list(model.parameters()) + list(model.buffers()), device)


def make_engine(ring: int | None) -> ZOEngine:
    offload = None if ring is None else OffloadConfig(enabled=True, ring=ring)
    return ZOEngine(opt_shape(), OptimConfig(lr=1e-7, eps=1e-3),
                    Objective("label_words", candidates=torch.tensor(LABELS)),
                    offload=offload, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per engine and round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--ring1", action="store_true", help="also time an engine with ring=1")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    engines = {"resident": make_engine(None), "offload": make_engine(args.ring)}
    if args.ring1:
        engines["ring1"] = make_engine(1)
    cpu = torch.device("cpu")
    resident_bytes = model_bytes(engines["resident"].model, cpu)
    vocab = engines["resident"].model.config.vocab_size
    batch = classification_batch(args.batch, args.seq, vocab, LABELS)

    times: dict[str, list[float]] = {name: [] for name in engines}
    telemetry: dict[str, dict] = {}

    def step(name: str) -> None:
        telemetry[name] = engines[name].step(batch).telemetry

    for name in engines:
        step(name)  # warm-up: noise kernels, scratch buffer, the ring's first pass order
    for _ in range(args.rounds):
        for name in engines:
            for _ in range(args.steps):
                times[name].append(timed(lambda name=name: step(name)))

    res_s, off_s = median(times["resident"]), median(times["offload"])
    tel = telemetry["offload"]
    figures = {
        "offload_over_resident": off_s / res_s,
        "device_bytes_ratio": engines["offload"].residency.device_bytes() / resident_bytes,
        "resident_step_s": res_s, "offload_step_s": off_s,
        "offload_up_mb": tel["offload_up_mb"], "offload_down_mb": tel["offload_down_mb"],
        "offload_up_gbps": tel["offload_up_gbps"], "offload_wait_s": tel["offload_wait_s"],
    }
    if args.ring1:
        figures["ring1_offload_over_resident"] = median(times["ring1"]) / res_s
        figures["ring1_device_bytes_ratio"] = (
            engines["ring1"].residency.device_bytes() / resident_bytes)
    figures.update({
        "offload_down_gbps": tel["offload_down_gbps"], "offload_uploads": tel["offload_uploads"],
        "offload_writebacks": tel["offload_writebacks"],
        "offload_device_mb": tel["offload_device_mb"], "resident_mb": resident_bytes / 2**20,
        "ring": args.ring, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "steps_per_round": args.steps,
        "loadavg_start": load_before, "loadavg_end": os.getloadavg()[0],  # other processes
    })
    for engine in engines.values():
        engine.close()
    report("offload_cpu", figures)


if __name__ == "__main__":
    main()
