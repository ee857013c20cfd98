"""Numba CPU kernels of :mod:`zo2.noise` (see there for the exact specification).

The hot loops are written so that LLVM vectorizes them (AVX2: 8 float lanes):

* Philox4x32-10 runs on 64-bit lanes whose upper halves are left as garbage; every
  product masks its operand to 32 bits first, which LLVM folds into ``vpmuludq``.
* The Box-Muller transform has no branches and no libm calls: the logarithm is a
  Cephes-style polynomial after an exponent/mantissa split, sine and cosine are
  polynomials on [-pi/4, pi/4] after an exact integer quadrant reduction, and all
  selections are bit masks.  Every multiply-add is an explicit ``fma`` so that the
  Triton kernels, which use the same operation sequence, give the same bits.
* Gaussian quads are made in two passes, Philox words into a struct-of-arrays scratch,
  then Box-Muller from it; smaller loop bodies vectorize better than one fused loop.
* Each kernel works on blocks of ``BLOCK`` output elements.  A block first generates
  the whole quads that cover it into a small scratch buffer (which stays in L1), then
  applies the operation (copy, ``fma`` with a base, in-place update) in a second,
  contiguous loop.  The unaligned head and tail (``start % 4``) are therefore just an
  offset into the scratch buffer and need no separate scalar path.

Arrays are float32, or 16-bit formats passed as their bits: an ``int16`` array holds
bfloat16 values and a ``uint16`` array IEEE float16 values.  They are widened to float32
when loaded and rounded to nearest even once when stored (bfloat16 as torch's scalar
conversion, NaN -> 0x7FC0; float16 with LLVM's ``fptrunc``, F16C instructions on x86), so no
float32 copy of a tensor is ever made: the extra memory is one scratch block.

Stochastic rounding (``add_blocks(..., stoch=True)``) decides between the two neighbours
of the float32 result with integer arithmetic on its bits only (see ``_sr_pick``), so it
is exact and the Triton kernels, which use the same integer steps, give the same bits.

The kernels are serial over a range of blocks and release the GIL (``nogil``);
:mod:`zo2.noise` runs block ranges on a small thread pool.  (A ``prange`` version was
as fast but doubled the first-compile time and started an OpenMP/TBB runtime next to
torch's.)  All kernels are compiled with ``cache=True``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from zo2._noise_consts import (  # shared with the Triton kernels
    _ANGLE,
    _C0,
    _C1,
    _C2,
    _L0,
    _L1,
    _L2,
    _L3,
    _L4,
    _L5,
    _L6,
    _L7,
    _L8,
    _LN2_HI,
    _LN2_LO,
    _S0,
    _S1,
    _S2,
    _TWO_M24,
)

BLOCK = 4096

_U32 = np.uint32
_U64 = np.uint64
_F = np.float32

_MASK = _U64(0xFFFFFFFF)
_S32 = _U64(32)
_M0 = _U64(0xD2511F53)
_M1 = _U64(0xCD9E8D57)
_W0 = _U64(0x9E3779B9)
_W1 = _U64(0xBB67AE85)

_NEG_HALF = _F(-0.5)
_ONE = _F(1.0)
_NEG_TWO = _F(-2.0)
_EXP_BIAS = _F(127.0)


@intrinsic
def _f32_from_bits(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    sig = types.float32(x)

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    """Reinterpret a float32 as a uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """float32 fused multiply-add ``a*b + c`` with one rounding (llvm.fma.f32)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _sqrt(typingctx, a):
    """Correctly rounded float32 square root (llvm.sqrt.f32, no errno call)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.sqrt", [ir.FloatType()])
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _half_to_f32(typingctx, x):
    """IEEE half (given as its 16 bits) to float32, exact (llvm fpext; F16C on x86)."""
    sig = types.float32(x)

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half(typingctx, x):
    """float32 to IEEE half bits, round to nearest even (llvm fptrunc)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _load(a, j):
    """a[j] widened to float32 (float32 array, int16 = bf16 bits, uint16 = fp16 bits)."""


def _store(a, j, v):
    """a[j] = float32 v rounded to nearest even in the array's format (see _load)."""


@overload(_load, inline="always")
def _load_impl(a, j):
    if a.dtype == types.float32:
        return lambda a, j: a[j]
    if a.dtype == types.int16:
        return lambda a, j: _f32_from_bits(_U32(_U32(_U32(a[j]) & _U32(0xFFFF)) << _U32(16)))
    if a.dtype == types.uint16:
        return lambda a, j: _half_to_f32(a[j])
    return None


@njit(inline="always")
def _bf16_nearest(b):
    """bf16 bits (in a uint32) of the float32 with bits b, round to nearest even."""
    r = _U32(_U32(b + _U32(_U32(0x7FFF) + _U32(_U32(b >> _U32(16)) & _U32(1)))) >> _U32(16))
    nan = _U32(b & _U32(0x7FFFFFFF)) > _U32(0x7F800000)
    return _U32(0x7FC0) if nan else r


def _bf16_store(a, j, v):
    a[j] = np.int16(_bf16_nearest(_bits_from_f32(v)))


def _half_store(a, j, v):
    a[j] = _f32_to_half(v)


def _f32_store(a, j, v):
    a[j] = v


@overload(_store, inline="always")
def _store_impl(a, j, v):
    if a.dtype == types.float32:
        return _f32_store
    if a.dtype == types.int16:
        return _bf16_store
    if a.dtype == types.uint16:
        return _half_store
    return None


def _store_sr(a, j, v, x):
    """a[j] = float32 v rounded stochastically to the array's format with random word x.

    float32 arrays store v unchanged (nothing to round).
    """


@njit(inline="always")
def _sr_pick(t, f_ceil, f_floor, neg, x):
    """Sign-magnitude bits of the stochastically rounded value (see ``zo2.noise``).

    v is the float32 value to round, t the magnitude bits (15-bit integer) of |v|
    truncated to the 16-bit format, d the format's spacing above t (a power of two) and
    F = 2**24 * (|v| - t) / d in [0, 2**24); f_ceil = ceil(F), f_floor = floor(F).  With
    m = x >> 8 (u = m * 2**-24), the rule "store the upper neighbour b iff u*(b - a) <
    v - a" (exact real arithmetic, a <= v <= b the two neighbours) reads:

    * v >= 0 (a = t, b = t + d): round away from zero iff m < F, i.e. m < f_ceil;
    * v < 0 (a = -(t + d), b = -t): round towards zero iff m < 2**24 - F, i.e. away iff
      m + F >= 2**24, i.e. m + f_floor >= 2**24 (m is an integer).

    Only integer adds, shifts and masks (no overflow: m < 2**24, f_floor < 2**24,
    f_ceil <= 2**24), hence exact; m < f_ceil is 1 - ((m + 2**24 - f_ceil) >> 24), and the
    sign selects with a mask (no branch, so that the loop vectorizes).  Rounding away
    adds one to the magnitude bits, which steps to the next binade correctly.
    """
    m = _U32(x >> _U32(8))
    sel = _U32(_U32(0) - neg)
    away_neg = _U32(_U32(m + f_floor) >> _U32(24))
    away_pos = _U32(_U32(1) - _U32(_U32(_U32(m + _U32(1 << 24)) - f_ceil) >> _U32(24)))
    away = _U32(_U32(away_neg & sel) | _U32(away_pos & _U32(~sel)))
    return _U32(_U32(t + away) | _U32(neg << _U32(15)))


@njit(inline="always")
def _bf16_stochastic(b, x):
    """bf16 bits of the float32 with bits b, rounded stochastically with random word x.

    bf16 is float32 with the low 16 bits cut off, for subnormals too: t = mag >> 16 and
    F = (mag & 0xFFFF) << 8 exactly.  Beyond the largest finite bf16 (0x7F7F), and for
    inf and NaN, the result is the nearest-even one.
    """
    mag = _U32(b & _U32(0x7FFFFFFF))
    f = _U32(_U32(mag & _U32(0xFFFF)) << _U32(8))
    r = _sr_pick(_U32(mag >> _U32(16)), f, f, _U32(b >> _U32(31)), x)
    return _bf16_nearest(b) if mag > _U32(0x7F7F0000) else r


@njit(inline="always")
def _half_stochastic(b, x):
    """IEEE half bits of the float32 with bits b, rounded stochastically with word x.

    |v| = M * 2**(max(E, 1) - 150) with E the float32 exponent field and M the mantissa
    with its implicit bit.  In the half range (E >= 113) the spacing is 2**(E - 137), so
    13 bits are cut: t = ((E - 113) << 10) + (M >> 13), F = (M & 0x1FFF) << 11.  Below
    (half subnormals, spacing 2**-24) |v| / 2**-24 = M / 2**sh with sh = 126 - max(E, 1)
    >= 14, so t = M >> sh (0 once sh >= 24) and F = (M mod 2**sh) * 2**(24 - sh): an
    integer while sh <= 24; for sh > 24 (|v| < 2**-25) F = M / 2**(sh - 24) has a
    fraction, f_floor = M >> k and f_ceil = f_floor + (M mod 2**k != 0) with
    k = min(sh - 24, 24) (M < 2**24).  Shift counts are clamped to <= 24.  Beyond 65504
    (the largest finite half), inf and NaN round to nearest even (in the caller).
    """
    mag = _U32(b & _U32(0x7FFFFFFF))
    e = _U32(mag >> _U32(23))
    mm = _U32(_U32(mag & _U32(0x7FFFFF)) | _U32(_U32(e > _U32(0)) << _U32(23)))
    sh = _U32(13) if e >= _U32(113) else _U32(_U32(126) - max(e, _U32(1)))
    shc = min(sh, _U32(24))
    t = _U32(_U32(_U32(max(e, _U32(113)) - _U32(113)) << _U32(10)) + _U32(mm >> shc))
    f = _U32(_U32(mm & _U32(_U32(_U32(1) << shc) - _U32(1))) << _U32(_U32(24) - shc))
    k = _U32(min(_U32(max(sh, _U32(24)) - _U32(24)), _U32(24)))
    lo = _U32(mm >> k)
    hi = _U32(lo + _U32(_U32(mm & _U32(_U32(_U32(1) << k) - _U32(1))) != _U32(0)))
    tiny = sh > _U32(24)
    f_ceil = hi if tiny else f
    f_floor = lo if tiny else f
    return _sr_pick(t, f_ceil, f_floor, _U32(b >> _U32(31)), x)


def _bf16_store_sr(a, j, v, x):
    a[j] = np.int16(_bf16_stochastic(_bits_from_f32(v), x))


@njit(inline="always")
def _half_sr(v, x):
    """IEEE half bits (in a uint32) of float32 v rounded stochastically with word x."""
    b = _bits_from_f32(v)
    near = _U32(_f32_to_half(v))
    return near if _U32(b & _U32(0x7FFFFFFF)) > _U32(0x477FE000) else _half_stochastic(b, x)


def _half_store_sr(a, j, v, x):
    a[j] = np.uint16(_half_sr(v, x))


def _f32_store_sr(a, j, v, x):
    a[j] = v


# Not inline="always" (numba IR inlining) as _store: LLVM then did not vectorize the fp16
# loop of add_blocks; as a separate function that LLVM inlines, it does (about 2x faster).
@overload(_store_sr)
def _store_sr_impl(a, j, v, x):
    if a.dtype == types.float32:
        return _f32_store_sr
    if a.dtype == types.int16:
        return _bf16_store_sr
    if a.dtype == types.uint16:
        return _half_store_sr
    return None


@njit(inline="always")
def _round(c0, c1, c2, c3, k0, k1):
    p0 = (c0 & _MASK) * _M0
    p1 = (c2 & _MASK) * _M1
    return (p1 >> _S32) ^ c1 ^ k0, p1, (p0 >> _S32) ^ c3 ^ k1, p0


@njit(inline="always")
def _philox(q, p0, p1, k0, k1):
    """Philox4x32-10 of counter (lo32(q), hi32(q), p0, p1) under key (k0, k1)."""
    c0, c1, c2, c3 = _round(q, q >> _S32, p0, p1, k0, k1)
    for _ in range(9):
        k0 = k0 + _W0
        k1 = k1 + _W1
        c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    return _U32(c0 & _MASK), _U32(c1 & _MASK), _U32(c2 & _MASK), _U32(c3 & _MASK)


@njit(cache=True)
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Scalar Philox4x32-10 (the kernels' own code), for known-answer tests."""
    q = _U64(c0) | (_U64(c1) << _S32)
    k0_ = _U64(k0)
    k1_ = _U64(k1)
    a, b, c, d = _round(q, q >> _S32, _U64(c2), _U64(c3), k0_, k1_)
    for _ in range(9):
        k0_ = k0_ + _W0
        k1_ = k1_ + _W1
        a, b, c, d = _round(a, b, c, d, k0_, k1_)
    return _U32(a & _MASK), _U32(b & _MASK), _U32(c & _MASK), _U32(d & _MASK)


@njit(inline="always")
def _gauss_pair(xa, xb):
    """Box-Muller of two uint32 words: (r*cos(2*pi*t), r*sin(2*pi*t)) in float32."""
    u = _F(np.int32(_U32(_U32(xa >> _U32(8)) + _U32(1)))) * _TWO_M24
    bits = _bits_from_f32(u)
    mb = _U32(_U32(bits & _U32(0x7FFFFF)) | _U32(0x3F800000))
    big = _U32(mb > _U32(0x3FB504F3))
    mb = _U32(mb - _U32(big << _U32(23)))
    ef = _F(np.int32(_U32(_U32(bits >> _U32(23)) + big))) - _EXP_BIAS
    f = _f32_from_bits(mb) - _ONE
    z = f * f
    z4 = z * z
    pab = _fma(_fma(_L5, f, _L6), z, _fma(_L7, f, _L8))
    pcd = _fma(_fma(_L1, f, _L2), z, _fma(_L3, f, _L4))
    p = _fma(_L0, z4 * z4, _fma(pcd, z4, pab))
    y = (f * z) * p
    y = _fma(ef, _LN2_LO, y)
    y = _fma(_NEG_HALF, z, y)
    ln_u = _fma(ef, _LN2_HI, f + y)
    r = _sqrt(ln_u * _NEG_TWO)
    kb = _U32(xb >> _U32(8))
    quad = _U32(_U32(kb + _U32(1 << 21)) >> _U32(22))
    th = _F(np.int32(_U32(kb - _U32(quad << _U32(22))))) * _ANGLE
    tt = th * th
    s = _fma(_fma(_fma(_S0, tt, _S1), tt, _S2) * tt, th, th)
    c = _fma(_fma(_fma(_C0, tt, _C1), tt, _C2), tt * tt, _fma(_NEG_HALF, tt, _ONE))
    sb = _bits_from_f32(s)
    cb = _bits_from_f32(c)
    swap = _U32(_U32(sb ^ cb) & _U32(_U32(0) - _U32(quad & _U32(1))))
    cos_b = _U32(_U32(cb ^ swap) ^ _U32(_U32(_U32(quad + _U32(1)) & _U32(2)) << _U32(30)))
    sin_b = _U32(_U32(sb ^ swap) ^ _U32(_U32(quad & _U32(2)) << _U32(30)))
    return r * _f32_from_bits(cos_b), r * _f32_from_bits(sin_b)


@njit(inline="always")
def _sign(x):
    """Rademacher value of one uint32 word: +1.0 if its top bit is set, else -1.0."""
    return _f32_from_bits(_U32(_U32(_U32(~x) & _U32(0x80000000)) | _U32(0x3F800000)))


@njit(inline="always")
def _store4(dst, i, a, b, c, d):
    o = _U64(4 * i)
    dst[o] = a
    dst[o + _U64(1)] = b
    dst[o + _U64(2)] = c
    dst[o + _U64(3)] = d


@njit
def _gen_gauss(dst, xs, q0, nq, p0, p1, k0, k1):
    """dst[4i:4i+4] = gaussian z of quad q0+i, i < nq; xs: (4, >= nq) uint32 scratch.

    Two passes: Philox words into xs (struct of arrays), then Box-Muller from xs.  This
    measured about 10% faster than one fused loop (smaller loop bodies vectorize better).
    """
    x0, x1, x2, x3 = xs[0], xs[1], xs[2], xs[3]
    for i in range(nq):
        j = _U64(i)
        x0[j], x1[j], x2[j], x3[j] = _philox(_U64(q0 + i), p0, p1, k0, k1)
    for i in range(nq):
        j = _U64(i)
        a, b = _gauss_pair(x0[j], x1[j])
        c, d = _gauss_pair(x2[j], x3[j])
        _store4(dst, i, a, b, c, d)


@njit(cache=True)
def stochastic_round(acc, x, out):
    """out[i] = float32 acc[i] rounded stochastically with word x[i] (the kernels' code).

    ``out`` int16 (bf16 bits) or uint16 (fp16 bits); for the tests.
    """
    for i in range(acc.shape[0]):
        _store_sr(out, i, acc[i], x[i])


@njit
def _gen_words(dst, q0, nq, p0, p1, k0, k1):
    """dst[4i + j] = Philox word x_j of quad q0+i, i < nq (uint32 dst)."""
    for i in range(nq):
        x0, x1, x2, x3 = _philox(_U64(q0 + i), p0, p1, k0, k1)
        _store4(dst, i, x0, x1, x2, x3)


@njit
def _gen_rad(dst, q0, nq, p0, p1, k0, k1):
    """dst[4i:4i+4] = rademacher z of quad q0+i, i < nq."""
    for i in range(nq):
        x0, x1, x2, x3 = _philox(_U64(q0 + i), p0, p1, k0, k1)
        _store4(dst, i, _sign(x0), _sign(x1), _sign(x2), _sign(x3))


@njit(inline="always")
def _gen_block(scratch, xs, start, n, b, seed, pkey, gauss):
    """Generate z for output block b into scratch; returns (out offset, length, shift)."""
    lo = b * BLOCK
    m = min(BLOCK, n - lo)
    e0 = start + lo
    q0 = e0 // 4
    nq = (e0 + m + 3) // 4 - q0
    p0 = _U64(pkey) & _MASK
    p1 = _U64(pkey) >> _S32
    k0 = _U64(seed) & _MASK
    k1 = _U64(seed) >> _S32
    if gauss:
        _gen_gauss(scratch, xs, q0, nq, p0, p1, k0, k1)
    else:
        _gen_rad(scratch, q0, nq, p0, p1, k0, k1)
    return lo, m, e0 - 4 * q0


@njit(cache=True, nogil=True)
def fill_blocks(out, start, seed, pkey, gauss, b0, b1):
    """out = z[start:start+len(out)] for output blocks b0..b1-1 (serial)."""
    scratch = np.empty(BLOCK + 8, np.float32)
    xs = np.empty((4, BLOCK // 4 + 2), np.uint32)
    n = out.shape[0]
    for b in range(b0, b1):
        lo, m, sh = _gen_block(scratch, xs, start, n, b, seed, pkey, gauss)
        for i in range(m):
            _store(out, _U64(lo + i), scratch[_U64(sh + i)])


@njit(cache=True, nogil=True)
def combine_blocks(out, base, coef, start, seed, pkey, gauss, b0, b1):
    """out = fma(coef, z, base) for output blocks b0..b1-1 (serial)."""
    scratch = np.empty(BLOCK + 8, np.float32)
    xs = np.empty((4, BLOCK // 4 + 2), np.uint32)
    n = out.shape[0]
    for b in range(b0, b1):
        lo, m, sh = _gen_block(scratch, xs, start, n, b, seed, pkey, gauss)
        for i in range(m):
            j = _U64(lo + i)
            _store(out, j, _fma(coef, scratch[_U64(sh + i)], _load(base, j)))


@njit(cache=True, nogil=True)
def add_blocks(w, seeds, coefs, decay, start, pkey, gauss, stoch, round_seed, b0, b1):
    """w = w*decay, then w = fma(coefs[j], z_{seeds[j]}, w) for each j (serial).

    The float32 result is stored rounded to nearest even, or, if ``stoch``, rounded
    stochastically with the Philox words of key ``round_seed`` (same counters as z).
    """
    scratch = np.empty(BLOCK + 8, np.float32)
    xs = np.empty((4, BLOCK // 4 + 2), np.uint32)
    acc = np.empty(BLOCK, np.float32)
    rbits = np.empty(BLOCK + 8 if stoch else 0, np.uint32)
    n = w.shape[0]
    for b in range(b0, b1):
        lo = b * BLOCK
        m = min(BLOCK, n - lo)
        for i in range(m):
            acc[_U64(i)] = _load(w, _U64(lo + i)) * decay
        for s in range(seeds.shape[0]):
            _, _, sh = _gen_block(scratch, xs, start, n, b, seeds[s], pkey, gauss)
            c = coefs[s]
            for i in range(m):
                acc[_U64(i)] = _fma(c, scratch[_U64(sh + i)], acc[_U64(i)])
        if stoch:
            e0 = start + lo
            q0 = e0 // 4
            nq = (e0 + m + 3) // 4 - q0
            p0 = _U64(pkey) & _MASK
            p1 = _U64(pkey) >> _S32
            k0 = _U64(round_seed) & _MASK
            k1 = _U64(round_seed) >> _S32
            _gen_words(rbits, q0, nq, p0, p1, k0, k1)
            sh = e0 - 4 * q0
            for i in range(m):
                _store_sr(w, _U64(lo + i), acc[_U64(i)], rbits[_U64(sh + i)])
        else:
            for i in range(m):
                _store(w, _U64(lo + i), acc[_U64(i)])
