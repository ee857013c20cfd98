"""Slow numpy reference of the noise specification in :mod:`zo2.noise`.

Philox4x32-10, the Gaussian and Rademacher transforms (float64 ln/cos/sin), the FMA
sequence of ``fill``/``combine``/``add_`` (FMA emulated in float64) and stochastic
rounding, written straight from the specification and independent of the kernels:
the tests hold the numba and Triton kernels against these functions.
"""

from __future__ import annotations

import numpy as np
import torch

from zo2.choices import DIRECTIONS as DISTS
from zo2.choices import ROUNDINGS

__all__ = [
    "philox4x32_reference",
    "reference_z",
    "reference_fill",
    "reference_combine",
    "reference_add",
    "reference_stochastic_round",
]


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_reference(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of counters ``ctr`` (shape (..., 4), uint32 words), numpy reference."""
    c = [np.asarray(ctr, dtype=np.uint64)[..., j] for j in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(_PHILOX_W[0])) & _M32
            k1 = (k1 + np.uint64(_PHILOX_W[1])) & _M32
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _M32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _M32,
        ]
    return np.stack(c, axis=-1).astype(np.uint32)


def _reference_words(n: int, seed: int, pkey: int, start: int = 0) -> np.ndarray:
    """Philox words (x0, x1, x2, x3) of the quads covering [start, start+n), shape (nq, 4)."""
    q = np.arange(start // 4, (start + n + 3) // 4, dtype=np.uint64)
    ctr = np.stack(
        [
            q & _M32,
            q >> np.uint64(32),
            np.full_like(q, pkey & 0xFFFFFFFF),
            np.full_like(q, pkey >> 32),
        ],
        axis=-1,
    )
    return philox4x32_reference(ctr, (seed & 0xFFFFFFFF, seed >> 32))


def reference_z(
    n: int, seed: int, pkey: int, start: int = 0, dist: str = "gaussian", dtype=np.float32
) -> np.ndarray:
    """z[start:start+n] from the specification (float64 ln/cos/sin), cast to ``dtype``."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    x = _reference_words(n, seed, pkey, start).reshape(-1, 2, 2)
    if dist == "rademacher":
        z = np.where(x >> np.uint32(31), 1.0, -1.0).reshape(-1)
    else:
        u = ((x[..., 0] >> np.uint32(8)).astype(np.float64) + 1.0) * 2.0**-24
        t = (x[..., 1] >> np.uint32(8)).astype(np.float64) * 2.0**-24
        r = np.sqrt(-2.0 * np.log(u))
        z = np.stack([r * np.cos(2 * np.pi * t), r * np.sin(2 * np.pi * t)], -1).reshape(-1)
    off = start - 4 * (start // 4)
    return z[off : off + n].astype(dtype)


def _fma32(a, b, c) -> np.ndarray:
    """float32 fma emulated in float64 (exact product; the sum is rounded twice)."""
    return (
        np.float64(np.float32(a)) * np.asarray(b, np.float64) + np.asarray(c, np.float64)
    ).astype(np.float32)


def reference_fill(n: int, seed: int, pkey: int, start: int = 0, dist: str = "gaussian"):
    """Reference of :func:`zo2.noise.fill` (float32 numpy array)."""
    return reference_z(n, seed, pkey, start, dist)


def reference_combine(base, seed, pkey, coef, start=0, dist="gaussian") -> np.ndarray:
    """Reference of :func:`zo2.noise.combine`: fma(coef, z, base) in float32."""
    base = np.asarray(base, np.float32)
    return _fma32(coef, reference_z(base.size, seed, pkey, start, dist), base)


def reference_stochastic_round(acc, dtype: torch.dtype, x) -> np.ndarray:
    """float32 ``acc`` (1-D) rounded stochastically to ``dtype`` with random words ``x``.

    Returns float32 values of ``dtype`` (``dtype`` bfloat16 or float16; ``x[i]`` the
    uint32 Philox word of element i).

    Straight from the specification, independent of the kernels' integer formulation:
    the nearest value (torch's conversion) and its other neighbour (one step of the
    magnitude bits), then ``u * (b - a) < acc - a`` in float64.  u * (b - a) is exact
    (24-bit u times a power of two >= 2**-133).  acc - a is exact unless acc is tiny
    next to b - a (|acc| < (b - a) * 2**-29, a or b then 0): if a == 0 it is acc; if
    b == 0 it lies within (b - a) * 2**-29 of b - a, above the largest u * (b - a),
    rounded or not.  So the comparison is the exact one.
    """
    acc = np.ascontiguousarray(acc, np.float32)
    x = np.asarray(x, np.uint32)
    near = torch.from_numpy(acc).to(dtype)
    nb = near.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    if dtype == torch.bfloat16:  # the spec's NaN (torch keeps sign and payload)
        nb = np.where(np.isnan(acc), 0x7FC0, nb)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are kept below
        nv = near.float().numpy().astype(np.float64)
        a64 = acc.astype(np.float64)
        # the other neighbour: one magnitude step up if nearest went towards zero, else down
        ob = np.where(np.abs(nv) < np.abs(a64), nb + 1, nb - 1) & 0xFFFF
        ov = torch.from_numpy(ob.astype(np.uint16).view(np.int16)).view(dtype).float()
        ov = ov.numpy().astype(np.float64)
        lo, hi = np.minimum(nv, ov), np.maximum(nv, ov)
        lo_bits, hi_bits = np.where(nv < ov, nb, ob), np.where(nv < ov, ob, nb)
        u = (x >> np.uint32(8)).astype(np.float64) * 2.0**-24
        take_hi = u * (hi - lo) < a64 - lo
        fmax = float(torch.finfo(dtype).max)
        keep = (nv == a64) | ~(np.abs(a64) <= fmax)  # exact, or inf/NaN/beyond max
    out = np.where(keep, nb, np.where(take_hi, hi_bits, lo_bits))
    res = torch.from_numpy(out.astype(np.uint16).view(np.int16)).view(dtype)
    return res.float().numpy()


def reference_add(
    w,
    seeds,
    coefs,
    pkey,
    start=0,
    dist="gaussian",
    decay=1.0,
    rounding="nearest",
    round_seed=0,
    dtype=None,
) -> np.ndarray:
    """Reference of :func:`zo2.noise.add_`: w*decay, then fma(coefs[j], z_j, acc) in order.

    Returns float32 values.  ``rounding="nearest"`` returns the float32 accumulator (its
    nearest-even conversion to w's dtype is what :func:`zo2.noise.add_` stores);
    ``"stochastic"`` returns it rounded stochastically to ``dtype`` (default: ``w``'s
    dtype if ``w`` is a torch tensor, else float32, which is not rounded).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if isinstance(w, torch.Tensor):
        dtype = w.dtype if dtype is None else dtype
        w = w.detach().cpu().float().numpy()
    acc = (np.asarray(w, np.float32) * np.float32(decay)).astype(np.float32)
    for s, c in zip(seeds, coefs, strict=True):
        acc = _fma32(c, reference_z(acc.size, s, pkey, start, dist), acc)
    if rounding == ROUNDINGS[0] or dtype in (None, torch.float32):
        return acc
    shape = acc.shape
    acc = acc.reshape(-1)
    x = _reference_words(acc.size, round_seed, pkey, start).reshape(-1)
    off = start - 4 * (start // 4)
    return reference_stochastic_round(acc, dtype, x[off : off + acc.size]).reshape(shape)
