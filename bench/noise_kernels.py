"""Micro-benchmark of the CPU noise kernels (zo2.noise) in ns per element.

Usage: ``python bench/noise_kernels.py [--n N] [--repeat R]``.  Times fill
(gaussian, rademacher), combine, add_ with 1 and 4 seeds, fill into bf16, and
torch.randn for comparison, with numba's default thread count and with one thread
(the per-core cost), plus the Gaussian accuracy against float64.  Prints a table, writes
``bench/results/noise_kernels.json`` and ends with one line of ``key=value`` pairs.
Figures are the median of R runs after a warm-up (which also compiles or loads the
numba cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch

from zo2 import noise


def _time_ns_per_el(fn, n: int, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) / n * 1e9


def _cases(n: int) -> dict:
    out = torch.empty(n)
    base = torch.randn(n)
    w = torch.randn(n)
    wb = torch.empty(n, dtype=torch.bfloat16)
    key = noise.param_key("model.layers.0.mlp.up_proj.weight")
    gen = torch.Generator().manual_seed(0)
    return {
        "fill_gauss": lambda: noise.fill(out, 1234, key, start=3),
        "fill_rad": lambda: noise.fill(out, 1234, key, start=3, dist="rademacher"),
        "combine_gauss": lambda: noise.combine(out, base, 1234, key, 1e-3, start=3),
        "add1_gauss": lambda: noise.add_(w, [1234], [1e-3], key, start=3, decay=0.999),
        "add4_gauss": lambda: noise.add_(w, [1, 2, 3, 4], [1e-3] * 4, key, start=3),
        "fill_gauss_bf16": lambda: noise.fill(wb, 1234, key, start=3),
        "torch_randn": lambda: torch.randn(n, out=out, generator=gen),
    }


def _accuracy(samples: int = 1 << 20) -> float:
    key = noise.param_key("accuracy")
    got = noise.fill(torch.empty(samples), 99, key, start=1).numpy().astype(np.float64)
    q = np.arange(0, (samples + 5) // 4, dtype=np.uint64)
    m = np.uint64(0xFFFFFFFF)
    ctr = np.stack(
        [q & m, q >> np.uint64(32), np.full_like(q, key & 0xFFFFFFFF), np.full_like(q, key >> 32)],
        -1,
    )
    x = noise.philox4x32_reference(ctr, (99, 0)).reshape(-1, 2, 2)
    u = ((x[..., 0] >> np.uint32(8)).astype(np.float64) + 1) * 2.0**-24
    t = (x[..., 1] >> np.uint32(8)).astype(np.float64) * 2.0**-24
    r = np.sqrt(-2 * np.log(u))
    ref = np.stack([r * np.cos(2 * np.pi * t), r * np.sin(2 * np.pi * t)], -1).reshape(-1)
    return float(np.abs(got - ref[1 : 1 + samples]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=7 << 20, help="elements per tensor")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    threads = noise.get_num_threads()
    cases = _cases(args.n)
    results: dict[str, float] = {}
    for nt, suffix in ((threads, ""), (1, "_1thread")):
        noise.set_num_threads(nt)
        torch.set_num_threads(nt)
        for name, fn in cases.items():
            results[name + suffix] = _time_ns_per_el(fn, args.n, args.repeat)
    noise.set_num_threads(threads)
    max_err = _accuracy()
    print(f"{'case':<18}{'ns/el (' + str(threads) + ' thr)':>16}{'ns/el (1 thr)':>16}")
    for name in cases:
        print(f"{name:<18}{results[name]:>16.3f}{results[name + '_1thread']:>16.3f}")
    print(f"gaussian max abs error vs float64: {max_err:.3g}")
    record = {
        "n": args.n,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "ns_per_element": {k: round(v, 4) for k, v in results.items()},
        "gauss_max_abs_err": max_err,
        "numba": numba.__version__,
        "torch": torch.__version__,
    }
    path = Path(__file__).resolve().parent / "results" / "noise_kernels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    pairs = [f"threads={threads}"] + [f"{k}={v:.3f}" for k, v in results.items()]
    print(" ".join(pairs + [f"gauss_max_abs_err={max_err:.3g}"]))


if __name__ == "__main__":
    main()
