"""Counter-based perturbation noise for zeroth-order (SPSA / MeZO) fine-tuning.

A random direction ``z`` is a pure function of (step seed, parameter key, element
index): any slice of any parameter can be generated on its own, on CPU or GPU, in any
order, without global RNG state, and gives the same values.

Specification
-------------
* ``param_key(name)``: the unsigned 64-bit little-endian integer of
  ``hashlib.blake2b(name.encode(), digest_size=8)``.
* Philox4x32-10 exactly as Random123 (M0=0xD2511F53, M1=0xCD9E8D57, W0=0x9E3779B9,
  W1=0xBB67AE85; 10 rounds, the key bumped between rounds).
* Key = (lo32(seed), hi32(seed)), ``seed`` an int in [0, 2**64).  For element index
  ``i`` of the flattened parameter: ``q = i // 4``, counter =
  (lo32(q), hi32(q), lo32(pkey), hi32(pkey)); Philox output (x0, x1, x2, x3).
* ``dist="gaussian"``: u = ((x0 >> 8) + 1) * 2**-24 in (0, 1], t = (x1 >> 8) * 2**-24,
  r = sqrt(-2 ln u); z[4q] = r*cos(2*pi*t), z[4q+1] = r*sin(2*pi*t); the same with
  (x2, x3) for z[4q+2], z[4q+3].  float32 result.
* ``dist="rademacher"``: z[4q+j] = +1.0 if (x_j >> 31) else -1.0.

Arithmetic and rounding
-----------------------
All arithmetic is float32 and the result is rounded once to the dtype of ``out``/``w``
(round to nearest even; bf16 NaN becomes 0x7FC0).  ``coef``, ``coefs`` and ``decay``
are rounded to float32 first; bf16/fp16 inputs are widened exactly.

* ``fill``:    out = z
* ``combine``: out = fma(coef, z, base)                       (one rounding, FMA)
* ``add_``:    acc = w * decay (float32 multiply, rounded; exact when decay == 1),
  then acc = fma(coefs[j], z_j, acc) for j = 0, 1, ... in order; w = acc.

Stochastic rounding
-------------------
``add_(..., rounding="stochastic", round_seed=s)`` stores the float32 ``acc`` of a
bf16/fp16 ``w`` rounded stochastically, so that updates below the resolution of ``w``
are kept on average.  Let a <= acc <= b be the two adjacent values of w's dtype (a == b
== acc when acc is representable: it is stored).  Random word: Philox4x32-10 with key
(lo32(s), hi32(s)) and the same counter as z (q = i // 4 of the element index i,
``pkey``); element i takes x = x_{i % 4} and u = (x >> 8) * 2**-24 in [0, 1).  Store b if
u * (b - a) < acc - a (exact real arithmetic), else a: b with probability
ceil(2**24 * (acc - a) / (b - a)) / 2**24, which is exactly (acc - a) / (b - a) except
for fp16 |acc| < 2**-25 (then less than 2**-24 above it).  inf, NaN and finite acc
beyond the dtype's largest finite value round to nearest even as above.  float32 ``w``
is not rounded (stochastic == nearest).  The kernels evaluate the rule with integer
arithmetic on the bits of acc (see ``_noise_cpu._sr_pick``), not in float32, where it
is inexact in corner cases (u * (b - a) underflows 2**-149 for bf16 |acc| < 2**-118;
acc - a is inexact for fp16 acc < 0 far below 2**-24); so they are exact and agree bit
for bit.

The Gaussian kernels evaluate ln, sin and cos with float32 polynomials (explicit FMAs,
no libm); their max abs error against the float64 evaluation of the formula above is
below 1e-6 (|z| <= 5.8).  The CPU (numba) and GPU (Triton) kernels run the same
float32 operation sequence, so they agree bit for bit (checked with Triton's
interpreter).  Rademacher results are bit-identical to the reference
(:mod:`zo2.noise_reference`); Gaussian ones agree with it within 2e-6 absolute.

Execution
---------
``tensor.device.type`` picks the kernels: "cpu" -> numba (:mod:`zo2._noise_cpu`),
"cuda" -> Triton (:mod:`zo2._noise_triton`, imported on first use only).  bf16 and
fp16 tensors are converted inside the kernels, block by block: no float32 copy of a
tensor is made (on CPU the extra memory is a 16 KiB scratch block per thread).  CPU
tensors of at least ``PARALLEL_MIN`` elements are split over a thread pool of
``get_num_threads()`` threads (default: ``torch.get_num_threads()``).  No
global RNG state is read or changed.

:mod:`zo2.noise_reference` is a slow numpy implementation of this specification
(float64 transcendental functions, FMA emulated in float64), used by the tests.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from zo2.choices import DIRECTIONS, ROUNDINGS

__all__ = [
    "DISTS",
    "ROUNDINGS",
    "param_key",
    "fill",
    "combine",
    "add_",
    "add_segments_",
    "set_num_threads",
    "get_num_threads",
]

DISTS = DIRECTIONS  # the distributions of z (zo2.choices)
PARALLEL_MIN = 1 << 16
"""CPU tensors with fewer elements run on the calling thread only."""

_threads: int | None = None
_pool_size = 0
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_cpu_module = None
_U64_LIMIT = 1 << 64
_START_LIMIT = 1 << 62
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def param_key(name: str) -> int:
    """Unsigned 64-bit key of a parameter name (blake2b, 8-byte digest, little-endian)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _check_u64(value: int, what: str) -> int:
    value = int(value)
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return value


def _check_common(t: torch.Tensor, start: int, dist: str, what: str) -> torch.Tensor:
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be a float32, bfloat16 or float16 tensor")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if not 0 <= int(start) < _START_LIMIT - t.numel():
        raise ValueError(f"start must be in [0, 2**62 - numel), got {start}")
    return t if t.dim() == 1 else t.view(-1)


def _cpu():
    """The numba kernels module (imported on first use, as numba is slow to import)."""
    global _cpu_module
    if _cpu_module is None:
        from zo2 import _noise_cpu

        _cpu_module = _noise_cpu
    return _cpu_module


def _triton():
    """The Triton kernels module (imported on the first CUDA tensor only)."""
    from zo2 import _noise_triton

    return _noise_triton


def _device(t: torch.Tensor) -> str:
    kind = t.device.type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"noise kernels run on cpu or cuda tensors, not {kind}")
    return kind


def _np(t: torch.Tensor) -> np.ndarray:
    """The numpy array the CPU kernels take: float32, or bf16/fp16 bits (int16/uint16)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.float32:
        return t.numpy()
    bits = t.view(torch.int16).numpy()
    return bits if t.dtype == torch.bfloat16 else bits.view(np.uint16)


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def set_num_threads(n: int | None) -> None:
    """Threads used by the CPU kernels; None: follow ``torch.get_num_threads()`` (default)."""
    global _threads, _pool
    if n is not None and int(n) < 1:
        raise ValueError(f"need at least one thread, got {n}")
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    _threads = None if n is None else int(n)


def get_num_threads() -> int:
    """Threads used by the CPU kernels: by default as many as torch's intra-op threads
    (so ``OMP_NUM_THREADS``, which torchrun sets to 1 per process, governs both)."""
    return _threads if _threads is not None else max(1, torch.get_num_threads())


def _run_cpu(kernel, a: np.ndarray, *args) -> None:
    """Run ``kernel(a, *args, b0, b1)`` over all blocks.

    Large tensors are cut into ``4 * threads`` block ranges that the calling thread and
    ``threads - 1`` pool threads take in turn (the kernels release the GIL), so a core
    that is busy with something else gets fewer of them.
    """
    global _pool, _pool_size
    nb = -(-a.shape[0] // _cpu().BLOCK)
    threads = get_num_threads()
    if a.shape[0] < PARALLEL_MIN or threads == 1:
        kernel(a, *args, 0, nb)
        return
    with _pool_lock:
        if _pool is None or _pool_size < threads - 1:
            if _pool is not None:
                _pool.shutdown()
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="zo2-noise")
            _pool_size = threads - 1
    parts = min(nb, 4 * threads)
    bounds = [nb * i // parts for i in range(parts + 1)]
    todo = iter(range(parts))

    def work() -> None:
        for i in todo:
            kernel(a, *args, bounds[i], bounds[i + 1])

    jobs = [_pool.submit(work) for _ in range(threads - 1)]
    work()
    for job in jobs:
        job.result()


def fill(
    out: torch.Tensor, seed: int, pkey: int, start: int = 0, dist: str = "gaussian"
) -> torch.Tensor:
    """Set ``out`` (flattened) to z[start:start+numel] of direction (seed, pkey); returns out."""
    flat = _check_common(out, start, dist, "out")
    seed, pkey, gauss = _check_u64(seed, "seed"), _check_u64(pkey, "pkey"), dist == DISTS[0]
    if flat.numel() == 0:
        return out
    if _device(flat) == "cuda":
        _triton().fill(flat, seed, pkey, int(start), gauss)
    else:
        k = _cpu()
        args = (np.int64(start), np.uint64(seed), np.uint64(pkey), gauss)
        _run_cpu(k.fill_blocks, _np(flat), *args)
    return out


def combine(
    out: torch.Tensor,
    base: torch.Tensor,
    seed: int,
    pkey: int,
    coef: float,
    start: int = 0,
    dist: str = "gaussian",
) -> torch.Tensor:
    """Set ``out = fma(coef, z, base)`` elementwise (e.g. the perturbed copy w0 + eps*z).

    ``out`` and ``base`` may be the same tensor (in place) but must not partly overlap.
    """
    flat = _check_common(out, start, dist, "out")
    bflat = _check_common(base, start, dist, "base")
    if bflat.numel() != flat.numel() or base.device != out.device:
        raise ValueError("out and base must have the same number of elements and device")
    seed, pkey, gauss = _check_u64(seed, "seed"), _check_u64(pkey, "pkey"), dist == DISTS[0]
    if flat.numel() == 0:
        return out
    if _device(flat) == "cuda":
        _triton().combine(flat, bflat, seed, pkey, float(coef), int(start), gauss)
    else:
        k = _cpu()
        args = (np.float32(coef), np.int64(start), np.uint64(seed), np.uint64(pkey), gauss)
        _run_cpu(k.combine_blocks, _np(flat), _np(bflat), *args)
    return out


def add_(
    w: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    pkey: int,
    start: int = 0,
    dist: str = "gaussian",
    decay: float = 1.0,
    rounding: str = "nearest",
    round_seed: int = 0,
) -> torch.Tensor:
    """In place ``w = w*decay + sum_j coefs[j] * z_{seeds[j]}`` (the ZO update); returns w.

    ``rounding="stochastic"`` rounds the float32 result of a bf16/fp16 ``w`` up or down at
    random with probabilities that make it unbiased, from the Philox stream of
    ``round_seed`` (see the module docstring); ``"nearest"`` rounds to nearest even.
    """
    flat = _check_common(w, start, dist, "w")
    seeds, coefs = _check_update(seeds, coefs, rounding)
    round_seed = _check_u64(round_seed, "round_seed")
    pkey, gauss = _check_u64(pkey, "pkey"), dist == DISTS[0]
    stoch = rounding == ROUNDINGS[1] and flat.dtype != torch.float32
    if flat.numel() == 0:
        return w
    if _device(flat) == "cuda":
        _triton().add_(flat, seeds, coefs, float(decay), pkey, int(start), gauss, stoch, round_seed)
        return w
    k = _cpu()
    args = (
        np.array(seeds, dtype=np.uint64),
        np.array(coefs, dtype=np.float32),
        np.float32(decay),
        np.int64(start),
        np.uint64(pkey),
        gauss,
        stoch,
        np.uint64(round_seed),
    )
    _run_cpu(k.add_blocks, _np(flat), *args)
    return w


def _check_update(seeds: Sequence[int], coefs: Sequence[float],
                  rounding: str) -> tuple[list[int], list[float]]:
    """An update's seeds (u64) and coefficients, one each, and its rounding."""
    seeds = [_check_u64(s, "seed") for s in seeds]
    coefs = [float(c) for c in coefs]
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefs")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return seeds, coefs


def add_segments_(
    flat: torch.Tensor,
    segments: Sequence[tuple[int, int, int, int, bool]],
    seeds: Sequence[int],
    coefs: Sequence[float],
    dist: str = "gaussian",
    decay: float = 1.0,
    rounding: str = "nearest",
    round_seed: int = 0,
) -> torch.Tensor:
    """:func:`add_` on several segments of one flat tensor; returns ``flat``.

    Each segment ``(offset, numel, pkey, start, decays)`` is
    ``add_(flat[offset:offset+numel], seeds, coefs, pkey, start, dist,
    decay if decays else 1.0, rounding, round_seed)``, with the same bits. On CUDA it is
    one kernel launch for all of them (an offloaded block's parameters), not one per
    segment; segments must not overlap.
    """
    if not segments:
        return flat
    flat = _check_common(flat, 0, dist, "flat")
    for offset, n, _, start, _ in segments:
        if not (0 <= offset and n >= 0 and offset + n <= flat.numel()):
            raise ValueError(f"segment [{offset}, {offset + n}) outside 0..{flat.numel()}")
        _check_common(flat[offset: offset + n], start, dist, "segment")
    if _device(flat) != "cuda":
        for offset, n, pkey, start, decays in segments:
            add_(flat[offset: offset + n], seeds, coefs, pkey, start, dist,
                 decay if decays else 1.0, rounding, round_seed)
        return flat
    seeds, coefs = _check_update(seeds, coefs, rounding)
    segments = [(int(o), int(n), _check_u64(k, "pkey"), int(s), bool(d))
                for o, n, k, s, d in segments if n > 0]
    if segments:
        _triton().add_segments_(flat, segments, seeds, coefs, float(decay), dist == DISTS[0],
                                rounding == ROUNDINGS[1], _check_u64(round_seed, "round_seed"))
    return flat

