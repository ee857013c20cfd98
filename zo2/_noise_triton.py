"""Triton kernels of :mod:`zo2.noise` for CUDA tensors (see there for the specification).

Imported lazily by :mod:`zo2.noise` the first time a CUDA tensor is passed, so that
importing ``zo2.noise`` never imports Triton.  The kernels run the same float32
operation sequence as the numba kernels in :mod:`zo2._noise_cpu` (explicit ``fma``,
correctly rounded ``sqrt_rn``, exact integer-to-float conversions) and are launched
with ``enable_fp_fusion=False`` so that the compiler adds no contractions of its own.

Each program handles ``BLOCK`` quads (4*BLOCK consecutive elements); the unaligned
head (``start % 4``) is a shift of the output positions, masked at both ends.  Keys and
positions are passed as int32 bit patterns / int64 and not specialized, so one
compiled kernel serves every seed.  An update's seeds and coefficients reach
``_add_kernel`` as one small int32 table per update and stream (:func:`_table`), copied
from page-locked memory without blocking the host.  Every launch runs on the device of
its tensor (:func:`_on_device`), whatever the current device is.  Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (used by the tests).
Stochastic rounding (``_add_kernel`` with ``STOCH``) uses the integer steps of the numba
kernels (``_noise_cpu._sr_pick``).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

from zo2 import _noise_consts as _cpu

BLOCK = 256
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _c(x) -> tl.constexpr:
    """A float32 constant, bit-identical to the numba kernels' one."""
    return tl.constexpr(float(np.float32(x)))


_TWO_M24 = _c(_cpu._TWO_M24)
_L0, _L1, _L2 = _c(_cpu._L0), _c(_cpu._L1), _c(_cpu._L2)
_L3, _L4, _L5 = _c(_cpu._L3), _c(_cpu._L4), _c(_cpu._L5)
_L6, _L7, _L8 = _c(_cpu._L6), _c(_cpu._L7), _c(_cpu._L8)
_LN2_LO, _LN2_HI = _c(_cpu._LN2_LO), _c(_cpu._LN2_HI)
_ANGLE = _c(_cpu._ANGLE)
_S0, _S1, _S2 = _c(_cpu._S0), _c(_cpu._S1), _c(_cpu._S2)
_C0, _C1, _C2 = _c(_cpu._C0), _c(_cpu._C1), _c(_cpu._C2)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _gauss_pair(xa, xb):
    u = ((xa >> 8) + 1).to(tl.int32).to(tl.float32) * _TWO_M24
    bits = u.to(tl.uint32, bitcast=True)
    mb = (bits & 0x7FFFFF) | 0x3F800000
    big = (mb > 0x3FB504F3).to(tl.uint32)
    mb = mb - (big << 23)
    ef = ((bits >> 23) + big).to(tl.int32).to(tl.float32) - 127.0
    f = mb.to(tl.float32, bitcast=True) - 1.0
    z = f * f
    z4 = z * z
    pab = tl.fma(tl.fma(f, _L5, _L6), z, tl.fma(f, _L7, _L8))
    pcd = tl.fma(tl.fma(f, _L1, _L2), z, tl.fma(f, _L3, _L4))
    p = tl.fma(z4 * z4, _L0, tl.fma(pcd, z4, pab))
    y = (f * z) * p
    y = tl.fma(ef, _LN2_LO, y)
    y = tl.fma(z, -0.5, y)
    ln_u = tl.fma(ef, _LN2_HI, f + y)
    r = tl.sqrt_rn(ln_u * -2.0)
    kb = xb >> 8
    quad = (kb + (1 << 21)) >> 22
    th = (kb - (quad << 22)).to(tl.int32, bitcast=True).to(tl.float32) * _ANGLE
    tt = th * th
    s = tl.fma(tl.fma(tl.fma(tt, _S0, _S1), tt, _S2) * tt, th, th)
    c = tl.fma(tl.fma(tl.fma(tt, _C0, _C1), tt, _C2), tt * tt, tl.fma(tt, -0.5, 1.0))
    sb = s.to(tl.uint32, bitcast=True)
    cb = c.to(tl.uint32, bitcast=True)
    swap = (sb ^ cb) & (0 - (quad & 1))
    cos_b = cb ^ swap ^ (((quad + 1) & 2) << 30)
    sin_b = sb ^ swap ^ ((quad & 2) << 30)
    return r * cos_b.to(tl.float32, bitcast=True), r * sin_b.to(tl.float32, bitcast=True)


@triton.jit
def _sign(x):
    return ((~x & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _words(q0, k0, k1, p0, p1, BLOCK: tl.constexpr):
    """Philox words (x0, x1, x2, x3) of quads q0 + [0, BLOCK).

    The key words (k0, k1) and parameter words (p0, p1) come as int32 with the bits of
    their uint32 values (Triton passes Python ints as signed); they are bit-cast here.
    """
    k0 = k0.to(tl.uint32, bitcast=True)
    k1 = k1.to(tl.uint32, bitcast=True)
    p0 = p0.to(tl.uint32, bitcast=True)
    p1 = p1.to(tl.uint32, bitcast=True)
    q = q0 + tl.arange(0, BLOCK).to(tl.int64)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = c0 * 0 + p0
    c3 = c0 * 0 + p1
    return _philox(c0, c1, c2, c3, k0, k1)


@triton.jit
def _quads(a, b, c, d, BLOCK: tl.constexpr):
    """[a0, b0, c0, d0, a1, b1, ...]: 4*BLOCK values from four BLOCK-vectors."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [4 * BLOCK])


@triton.jit
def _z(q0, k0, k1, p0, p1, GAUSS: tl.constexpr, BLOCK: tl.constexpr):
    """z of quads q0 + [0, BLOCK), as 4*BLOCK consecutive float32 values."""
    x0, x1, x2, x3 = _words(q0, k0, k1, p0, p1, BLOCK)
    if GAUSS:
        a, b = _gauss_pair(x0, x1)
        c, d = _gauss_pair(x2, x3)
    else:
        a, b, c, d = _sign(x0), _sign(x1), _sign(x2), _sign(x3)
    return _quads(a, b, c, d, BLOCK)


@triton.jit
def _positions(n, q_lo, shift, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pos = pid * 4 * BLOCK + tl.arange(0, 4 * BLOCK).to(tl.int64) - shift
    return q_lo + pid * BLOCK, pos, (pos >= 0) & (pos < n)


@triton.jit
def _load(ptr, pos, mask, BF16: tl.constexpr):
    """Load as float32; BF16: ptr holds bfloat16 bits as int16."""
    x = tl.load(ptr + pos, mask=mask, other=0)
    if BF16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _bf16_nearest(b):
    """bf16 bits (in a uint32) of the float32 with bits b: nearest even, NaN -> 0x7FC0."""
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)


@triton.jit
def _store(ptr, pos, v, mask, BF16: tl.constexpr):
    """Store float32 v rounded to nearest even; BF16 explicitly (NaN -> 0x7FC0), as torch."""
    if BF16:
        r = _bf16_nearest(v.to(tl.uint32, bitcast=True))
        tl.store(ptr + pos, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + pos, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sr_pick(t, f_ceil, f_floor, neg, x):
    """Sign-magnitude bits of the stochastic rounding (``_noise_cpu._sr_pick``)."""
    m = x >> 8
    away = tl.where(neg != 0, m + f_floor >= 0x1000000, m < f_ceil)
    return (t + away.to(tl.uint32)) | (neg << 15)


@triton.jit
def _store_sr(ptr, pos, v, mask, x, BF16: tl.constexpr):
    """Store float32 v rounded stochastically with random words x to bf16 (int16 bits,
    BF16) or float16, as ``_noise_cpu._bf16_stochastic`` / ``_half_stochastic``."""
    b = v.to(tl.uint32, bitcast=True)
    mag = b & 0x7FFFFFFF
    neg = b >> 31
    if BF16:
        f = (mag & 0xFFFF) << 8
        r = _sr_pick(mag >> 16, f, f, neg, x)
        r = tl.where(mag > 0x7F7F0000, _bf16_nearest(b), r)
        tl.store(ptr + pos, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        e = mag >> 23
        mm = (mag & 0x7FFFFF) | ((e > 0).to(tl.uint32) << 23)
        sh = tl.where(e >= 113, 13, 126 - tl.maximum(e, 1))
        shc = tl.minimum(sh, 24)
        t = ((tl.maximum(e, 113) - 113) << 10) + (mm >> shc)
        f = (mm & ((1 << shc) - 1)) << (24 - shc)
        k = tl.minimum(tl.maximum(sh, 24) - 24, 24)
        lo = mm >> k
        hi = lo + ((mm & ((1 << k) - 1)) != 0).to(tl.uint32)
        tiny = sh > 24
        f_ceil = tl.where(tiny, hi, f)
        f_floor = tl.where(tiny, lo, f)
        r = _sr_pick(t, f_ceil, f_floor, neg, x).to(tl.uint16).to(tl.float16, bitcast=True)
        r = tl.where(mag > 0x477FE000, v.to(tl.float16), r)
        tl.store(ptr + pos, r, mask=mask)


@triton.jit(do_not_specialize=["n", "q_lo", "shift", "k0", "k1", "p0", "p1"])
def _fill_kernel(
    out,
    n,
    q_lo,
    shift,
    k0,
    k1,
    p0,
    p1,
    GAUSS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    q0, pos, mask = _positions(n, q_lo, shift, BLOCK)
    z = _z(q0, k0, k1, p0, p1, GAUSS, BLOCK)
    _store(out, pos, z, mask, OUT_BF16)


@triton.jit(do_not_specialize=["n", "q_lo", "shift", "k0", "k1", "p0", "p1"])
def _combine_kernel(
    out,
    base,
    coef,
    n,
    q_lo,
    shift,
    k0,
    k1,
    p0,
    p1,
    GAUSS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BASE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    q0, pos, mask = _positions(n, q_lo, shift, BLOCK)
    z = _z(q0, k0, k1, p0, p1, GAUSS, BLOCK)
    _store(out, pos, tl.fma(z, coef, _load(base, pos, mask, BASE_BF16)), mask, OUT_BF16)


@triton.jit
def _update(ptr, pos, mask, acc, table, n_seeds, q0, p0, p1, rk0, rk1, GAUSS: tl.constexpr,
            OUT_BF16: tl.constexpr, STOCH: tl.constexpr, BLOCK: tl.constexpr):
    """acc += sum_s coef_s * z_s over the update table's (k0, k1, coef bits) rows, then
    store it (rounded to nearest, or stochastically with the words of (rk0, rk1))."""
    for s in range(n_seeds):
        k0 = tl.load(table + 3 * s)
        k1 = tl.load(table + 3 * s + 1)
        c = tl.load(table + 3 * s + 2).to(tl.float32, bitcast=True)
        z = _z(q0, k0, k1, p0, p1, GAUSS, BLOCK)
        acc = tl.fma(z, c, acc)
    if STOCH:
        x0, x1, x2, x3 = _words(q0, rk0, rk1, p0, p1, BLOCK)
        _store_sr(ptr, pos, acc, mask, _quads(x0, x1, x2, x3, BLOCK), OUT_BF16)
    else:
        _store(ptr, pos, acc, mask, OUT_BF16)


@triton.jit(do_not_specialize=["n", "q_lo", "shift", "p0", "p1", "rk0", "rk1", "n_seeds"])
def _add_kernel(
    w,
    table,
    n_seeds,
    decay,
    n,
    q_lo,
    shift,
    p0,
    p1,
    rk0,
    rk1,
    GAUSS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    STOCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    q0, pos, mask = _positions(n, q_lo, shift, BLOCK)
    acc = _load(w, pos, mask, OUT_BF16) * decay
    _update(w, pos, mask, acc, table, n_seeds, q0, p0, p1, rk0, rk1, GAUSS, OUT_BF16, STOCH,
            BLOCK)


@triton.jit(do_not_specialize=["n_seeds", "n_segs", "rk0", "rk1"])
def _add_segments_kernel(
    w,
    table,
    n_seeds,
    decay,
    segs,
    n_segs,
    rk0,
    rk1,
    GAUSS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    STOCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``_add_kernel`` over several segments of one flat buffer in one launch.

    Row ``k`` of ``segs`` (int64): offset into ``w``, numel, q_lo, shift, the parameter
    key words, whether ``decay`` applies, and the segment's first program. Program ``g``
    finds its segment (the last whose first program is <= g) and runs exactly what
    ``_add_kernel``'s program ``g - first`` would run on that segment alone.
    """
    g = tl.program_id(0).to(tl.int64)
    s = 0
    for k in range(1, n_segs):
        s += (tl.load(segs + 8 * k + 7) <= g).to(tl.int32)
    row = segs + 8 * s
    n = tl.load(row + 1)
    q_lo = tl.load(row + 2)
    shift = tl.load(row + 3)
    p0 = tl.load(row + 4).to(tl.int32)
    p1 = tl.load(row + 5).to(tl.int32)
    j = g - tl.load(row + 7)
    pos = j * 4 * BLOCK + tl.arange(0, 4 * BLOCK).to(tl.int64) - shift
    mask = (pos >= 0) & (pos < n)
    q0 = q_lo + j * BLOCK
    ptr = w + tl.load(row)
    acc = _load(ptr, pos, mask, OUT_BF16) * tl.where(tl.load(row + 6) != 0, decay, 1.0)
    _update(ptr, pos, mask, acc, table, n_seeds, q0, p0, p1, rk0, rk1, GAUSS, OUT_BF16, STOCH,
            BLOCK)


def _i32(v: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    return ((v & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


def _launch(kernel, n: int, start: int, head: tuple, tail: tuple, **constexprs) -> None:
    """kernel[grid](*head, n, q_lo, shift, *tail, **constexprs) over ceil((n + shift) / 4B)."""
    q_lo, shift = start // 4, start % 4
    grid = (triton.cdiv(n + shift, 4 * BLOCK),)
    opts = {} if _INTERPRET else {"enable_fp_fusion": False}
    with _on_device(head[0]):
        kernel[grid](*head, n, q_lo, shift, *tail, BLOCK=BLOCK, **constexprs, **opts)


def _on_device(t: torch.Tensor):
    """Make ``t``'s device current for a launch: Triton launches on the current device
    and its current stream, which need not be ``t``'s (a run on ``cuda:1``)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_tables: dict[object, tuple[tuple, torch.Tensor]] = {}  # stream -> (update, its table)


def _table(seeds, coefs, device: torch.device) -> torch.Tensor:
    """The rows ``(lo32(seed), hi32(seed), float32 bits of coef)`` as an int32 tensor on
    ``device``, made once per update and stream.

    Every parameter of an update shares the table, so it crosses the bus once per
    update, not once per launch, and from page-locked memory with ``non_blocking``: a
    copy from pageable memory would block the host until the stream drained (a host
    sync per parameter). The table is kept per stream because it is allocated on, and
    read without an event by, the stream current when it was made (the upload stream
    of the offloader, the compute stream); the caching allocators free the replaced
    tensors only once the work queued on that stream before has run.
    """
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else device
    update = (tuple(seeds), tuple(coefs))
    cached = _tables.get(stream)
    if cached is not None and cached[0] == update:
        return cached[1]
    rows = [[_i32(s), _i32(s >> 32), _f32_bits(c)] for s, c in zip(*update)] or [[0, 0, 0]]
    table = torch.tensor(rows, dtype=torch.int32)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _tables[stream] = (update, table)
    return table


_segment_tables: dict[tuple, tuple[torch.Tensor, int]] = {}  # (stream, segments) -> table


def _segments(segments, device: torch.device) -> tuple[torch.Tensor, int]:
    """(rows of ``_add_segments_kernel`` as an int64 tensor on ``device``, programs).

    A block's segments are the same at every update: the table is made once per block
    layout and stream (as :func:`_table`, from page-locked memory, without blocking).
    """
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else device
    key = (stream, tuple(segments))
    cached = _segment_tables.get(key)
    if cached is not None:
        return cached
    rows, programs = [], 0
    for offset, n, pkey, start, decays in segments:
        q_lo, shift = start // 4, start % 4
        rows.append([offset, n, q_lo, shift, _i32(pkey), _i32(pkey >> 32), int(decays),
                     programs])
        programs += triton.cdiv(n + shift, 4 * BLOCK)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    if len(_segment_tables) >= 4096:  # a bound; the tables are freed in stream order
        _segment_tables.clear()
    _segment_tables[key] = (table, programs)
    return table, programs


def _f32_bits(c: float) -> int:
    return int(np.float32(c).view(np.int32))


def _keys(seed: int, pkey: int) -> tuple[int, int, int, int]:
    return _i32(seed), _i32(seed >> 32), _i32(pkey), _i32(pkey >> 32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are passed to the kernels as their int16 bits."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def fill(out: torch.Tensor, seed: int, pkey: int, start: int, gauss: bool) -> None:
    """out = z[start:start+numel] (out contiguous, 1-D)."""
    bf16 = out.dtype == torch.bfloat16
    _launch(
        _fill_kernel,
        out.numel(),
        start,
        (_bits(out),),
        _keys(seed, pkey),
        GAUSS=gauss,
        OUT_BF16=bf16,
    )


def combine(out, base, seed: int, pkey: int, coef: float, start: int, gauss: bool) -> None:
    """out = fma(coef, z, base)."""
    head = (_bits(out), _bits(base), float(np.float32(coef)))
    _launch(
        _combine_kernel,
        out.numel(),
        start,
        head,
        _keys(seed, pkey),
        GAUSS=gauss,
        OUT_BF16=out.dtype == torch.bfloat16,
        BASE_BF16=base.dtype == torch.bfloat16,
    )


def add_(
    w,
    seeds,
    coefs,
    decay: float,
    pkey: int,
    start: int,
    gauss: bool,
    stochastic: bool = False,
    round_seed: int = 0,
) -> None:
    """w = w*decay, then w = fma(coefs[j], z_{seeds[j]}, w) for each j, in place.

    The result is rounded to nearest even, or if ``stochastic`` (bf16/fp16 ``w`` only)
    stochastically with the words of key ``round_seed``.  The seeds' keys and the
    coefficients are read from the update's table (:func:`_table`).
    """
    with _on_device(w):  # the table goes to w's device, on the stream of the launch
        table = _table(seeds, coefs, w.device)
        head = (_bits(w), table, len(seeds), float(np.float32(decay)))
        stochastic = bool(stochastic) and w.dtype != torch.float32
        _launch(
            _add_kernel,
            w.numel(),
            start,
            head,
            _keys(round_seed, pkey)[2:] + _keys(round_seed, pkey)[:2],
            GAUSS=gauss,
            OUT_BF16=w.dtype == torch.bfloat16,
            STOCH=stochastic,
        )


def add_segments_(w, segments, seeds, coefs, decay: float, gauss: bool,
                  stochastic: bool = False, round_seed: int = 0) -> None:
    """:func:`add_` on each ``(offset, numel, pkey, start, decays)`` segment of ``w``
    (``decay`` where ``decays``, else 1), in one launch: the same bits."""
    with _on_device(w):
        table = _table(seeds, coefs, w.device)
        segs, programs = _segments(segments, w.device)
        stochastic = bool(stochastic) and w.dtype != torch.float32
        opts = {} if _INTERPRET else {"enable_fp_fusion": False}
        rk0, rk1 = _keys(round_seed, 0)[:2]
        _add_segments_kernel[(programs,)](
            _bits(w), table, len(seeds), float(np.float32(decay)), segs, len(segments),
            rk0, rk1, GAUSS=gauss, OUT_BF16=w.dtype == torch.bfloat16, STOCH=stochastic,
            BLOCK=BLOCK, **opts)
