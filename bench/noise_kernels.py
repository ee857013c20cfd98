"""Micro-benchmark of the CPU noise kernels (zo2.noise) in ns per element.

Usage: ``python -m bench.noise_kernels [--n N] [--repeat R]``.  Times fill
(gaussian, rademacher), combine, add_ with 1 and 4 seeds, fill into bf16, and
torch.randn for comparison, with numba's default thread count and with one thread
(the per-core cost), plus the Gaussian accuracy against float64.  Prints a table, writes
``bench/results/noise_kernels.json`` (``common.report``) and ends with one line of
``key=value`` pairs.

Figures are the median of R runs after a warm-up (which also compiles or loads the
numba cache).  The noise kernels use ``noise.get_num_threads()`` threads (default
``NUMBA_NUM_THREADS``: all cores); torch.randn gets as many torch threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bench.common import report
from zo2 import noise, noise_reference


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
    """Max abs error of Gaussian z against the float64 evaluation of the formula."""
    key = noise.param_key("accuracy")
    got = noise.fill(torch.empty(samples), 99, key, start=1).numpy().astype(np.float64)
    ref = noise_reference.reference_z(samples, 99, key, 1, dtype=np.float64)
    return float(np.abs(got - ref).max())


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
    torch.set_num_threads(threads)
    max_err = _accuracy()
    load = os.getloadavg()[0]
    print(f"{'case (ns/element)':<20}{str(threads) + ' threads':>12}{'1 thread':>12}")
    for name in cases:
        print(f"{name:<20}{results[name]:>12.3f}{results[name + '_1thread']:>12.3f}")
    print(f"gaussian max abs error vs float64: {max_err:.3g}")
    print(f"load average: {load:.2f} (other processes on the machine skew the figures)")
    figures = {"n": args.n, "noise_threads": threads, "loadavg_1min": round(load, 2)}
    figures.update({f"{k}_ns": round(v, 4) for k, v in results.items()})
    figures["gauss_max_abs_err"] = max_err
    report("noise_kernels", figures)


if __name__ == "__main__":
    main()
