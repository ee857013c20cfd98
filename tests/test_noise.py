"""Tests of zo2.noise: Philox known answers, kernels vs reference, slices, dtypes, statistics."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from zo2 import _noise_cpu, noise, noise_reference

# The float32 Gaussian kernel against the float64 specification (reference_z). z = r*c,
# r = sqrt(-2 ln u) <= sqrt(48 ln 2) = 5.77, c = cos or sin of theta in [-pi/4, pi/4] after
# the quadrant reduction. Errors (u = 2**-24): ln by Cephes' logf polynomial, peak relative
# 7.6e-8 (Cephes' documented figure), so r is within 3.8e-8 + u/2 (the correctly rounded
# sqrt) = 6.8e-8 relative; theta = k * float32(pi 2**-23) within u relative, 4.7e-8
# absolute at pi/4; sinf / cosf polynomials within 1.2e-7 absolute (Cephes' peak); the
# product rounds by u/2 and the reference's cast to float32 by u/2 more. Together
# 5.77 * (6.8e-8 + 4.7e-8 + 1.2e-7 + 3e-8 + 3e-8) = 1.7e-6 <= 2e-6. Every operation is a
# correctly rounded float32 op or an explicit fma, so the figure does not depend on the
# CPU's SIMD width (measured 5.4e-7 on AVX-512 and with AVX2 forced).
GAUSS_ATOL = 2e-6
DISTS = ("gaussian", "rademacher")
BIG = noise.PARALLEL_MIN + 4099  # takes the parallel (prange) path
KEY = noise.param_key("model.layers.3.self_attn.q_proj.weight")

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _fill(n, seed, pkey, start=0, dist="gaussian", dtype=torch.float32):
    return noise.fill(torch.empty(n, dtype=dtype), seed, pkey, start, dist)


def _check(got: torch.Tensor, ref: np.ndarray, dist: str) -> None:
    got = got.float().numpy()
    if dist == "rademacher":
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=GAUSS_ATOL)


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    ref = noise_reference.philox4x32_reference(np.array([ctr], dtype=np.uint32), key)[0]
    assert tuple(int(v) for v in ref) == expected
    assert tuple(int(v) for v in _noise_cpu.philox4x32(*ctr, *key)) == expected


def test_param_key():
    name = "model.embed_tokens.weight"
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    assert noise.param_key(name) == int.from_bytes(digest, "little")
    assert 0 <= noise.param_key(name) < 2**64
    assert noise.param_key(name) != noise.param_key(name + ".")


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 4099, BIG])
@pytest.mark.parametrize("start", [0, 1, 2, 3, 4093, 2**33 + 6])
def test_numba_matches_reference(dist, n, start):
    for seed, pkey in ((0, 0), (2**64 - 1, KEY), (12345, 2**63 + 7)):
        got = _fill(n, seed, pkey, start, dist)
        _check(got, noise_reference.reference_fill(n, seed, pkey, start, dist), dist)


@pytest.mark.parametrize("dist", DISTS)
def test_slices_match_full_fill(dist):
    full = _fill(BIG + 10, 77, KEY, 0, dist)
    for a, b in [(0, 1), (1, 2), (3, 9), (5, 4101), (4095, 4097), (1001, BIG + 10), (7, BIG)]:
        part = _fill(b - a, 77, KEY, a, dist)
        assert torch.equal(part, full[a:b]), (a, b)
        view = torch.zeros(BIG + 10)
        noise.fill(view[a:b], 77, KEY, a, dist)
        assert torch.equal(view[a:b], full[a:b])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4101, BIG])
def test_low_precision_is_fp32_rounded_once(dtype, n):
    start, seeds, coefs = 3, [5, 2**40 + 1], [0.01, -0.003]
    assert torch.equal(_fill(n, 9, KEY, start, dtype=dtype), _fill(n, 9, KEY, start).to(dtype))
    base = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = noise.combine(torch.empty(n), base.float(), 9, KEY, 0.02, start)
    assert torch.equal(
        noise.combine(torch.empty(n, dtype=dtype), base, 9, KEY, 0.02, start), want.to(dtype)
    )
    assert torch.equal(noise.combine(torch.empty(n), base, 9, KEY, 0.02, start), want)
    w = base.clone()
    want = noise.add_(base.float(), seeds, coefs, KEY, start, decay=0.999)
    assert torch.equal(noise.add_(w, seeds, coefs, KEY, start, decay=0.999), want.to(dtype))


def test_bf16_special_values_round_like_torch():
    x = torch.tensor([1.0, 1.00390625, 1.01171875, -3.0e38, float("inf"), 1e-40, float("nan")])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    noise.combine(out, x, 1, 2, 0.0, 0, "rademacher")
    assert torch.equal(out[:-1].view(torch.int16), x[:-1].to(torch.bfloat16).view(torch.int16))
    assert out[-1].view(torch.int16).item() == 0x7FC0


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("n", [4099, BIG])
def test_add_several_seeds_with_decay_matches_reference(dist, n):
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(2))
    seeds, coefs = [1, 2**64 - 1, 99, 2**32], [1e-3, -2e-3, 0.5, -0.25]
    got = noise.add_(w0.clone(), seeds, coefs, KEY, start=5, dist=dist, decay=0.98)
    _check(got, noise_reference.reference_add(w0.numpy(), seeds, coefs, KEY, 5, dist, 0.98), dist)
    got = noise.add_(w0.clone(), [], [], KEY, decay=0.5)
    assert torch.equal(got, w0 * 0.5)


@pytest.mark.parametrize("dist", DISTS)
def test_combine(dist):
    base = torch.randn(BIG, generator=torch.Generator().manual_seed(3))
    got = noise.combine(torch.empty(BIG), base, 4, KEY, 1e-3, 11, dist)
    _check(got, noise_reference.reference_combine(base.numpy(), 4, KEY, 1e-3, 11, dist), dist)
    assert torch.equal(noise.combine(torch.empty(BIG), base, 4, KEY, 0.0, 11, dist), base)
    inplace = base.clone()
    assert torch.equal(noise.combine(inplace, inplace, 4, KEY, 1e-3, 11, dist), got)


def test_gaussian_accuracy_vs_float64():
    n = 1_000_000
    got = _fill(n, 31, KEY, 1).numpy().astype(np.float64)
    ref = noise_reference.reference_z(n, 31, KEY, 1, dtype=np.float64)
    assert np.abs(got - ref).max() <= GAUSS_ATOL


def test_gaussian_statistics():
    z = _fill(1_000_000, 2024, KEY).double()
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - 1.0) < 7e-3
    assert abs((z**4).mean().item() - 3.0) < 0.05
    assert z.abs().max().item() <= np.sqrt(-2 * np.log(2.0**-24)) + 1e-5
    for k, p_two_sided in ((1.0, 0.31731), (2.0, 0.04550), (3.0, 0.0026998)):
        frac = (z.abs() > k).double().mean().item()
        assert abs(frac - p_two_sided) < 5 * np.sqrt(p_two_sided / 1e6), k
    assert 30 <= int((z.abs() > 4).sum()) <= 100  # expected 63


def test_rademacher_balanced():
    z = _fill(1_000_000, 5, KEY, dist="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5e-3


@pytest.mark.parametrize("dist", DISTS)
def test_streams_uncorrelated(dist):
    n = 1_000_000
    a = _fill(n + 8, 1000, KEY, dist=dist).double()
    others = [
        _fill(n, 1001, KEY, dist=dist),
        _fill(n, 1000, KEY + 1, dist=dist),
        _fill(n, 1000 + 2**32, KEY, dist=dist),
        _fill(n, 1000, noise.param_key("model.layers.3.self_attn.k_proj.weight"), dist=dist),
        a[4 : n + 4],
        a[1 : n + 1],
    ]
    for b in others:
        corr = np.corrcoef(a[:n].numpy(), b.double().numpy())[0, 1]
        assert abs(corr) < 5e-3


def test_deterministic_and_independent_of_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    first = _fill(BIG, 8, KEY, 3)
    torch.manual_seed(123)
    torch.randn(10)
    np.random.seed(1)
    assert torch.equal(_fill(BIG, 8, KEY, 3), first)
    assert not torch.equal(_fill(BIG, 9, KEY, 3), first)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _fill(4, 1, 2, dist="uniform")
    with pytest.raises(ValueError):
        _fill(4, 2**64, 2)
    with pytest.raises(ValueError):
        _fill(4, 1, -1)
    with pytest.raises(ValueError):
        _fill(4, 1, 2, start=-1)
    with pytest.raises(ValueError):
        noise.fill(torch.empty(4, 4).t(), 1, 2)
    with pytest.raises(TypeError):
        noise.fill(torch.empty(4, dtype=torch.int32), 1, 2)
    with pytest.raises(ValueError):
        noise.combine(torch.empty(4), torch.empty(5), 1, 2, 0.1)
    with pytest.raises(ValueError):
        noise.add_(torch.empty(4), [1, 2], [0.1], 2)


def test_empty_and_nd_tensors():
    assert _fill(0, 1, 2).numel() == 0
    out = noise.fill(torch.empty(3, 5), 1, 2, 7)
    assert torch.equal(out.view(-1), _fill(15, 1, 2, 7))


LOW = [torch.bfloat16, torch.float16]


def _bits32(t: torch.Tensor) -> np.ndarray:
    """float32 bit patterns of a bf16/fp16 tensor widened exactly (keeps -0 and NaN)."""
    return t.float().numpy().view(np.uint32)


def _ref_bits32(ref: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ref, np.float32).view(np.uint32)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,start", [(1, 0), (7, 3), (4099, 5), (BIG, 2**33 + 6)])
def test_stochastic_add_matches_reference(dtype, n, start):
    w0 = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.3).to(dtype)
    for seeds, coefs in (([3], [1e-3]), ([3, 2**64 - 1], [1e-3, -2e-3])):
        rs = 2**63 + n
        # rademacher: the kernel's float32 accumulator equals the reference's exactly
        got = noise.add_(
            w0.clone(), seeds, coefs, KEY, start, "rademacher", 0.999, "stochastic", rs
        )
        ref = noise_reference.reference_add(
            w0, seeds, coefs, KEY, start, "rademacher", 0.999, "stochastic", rs
        )
        np.testing.assert_array_equal(_bits32(got), _ref_bits32(ref))
        # gaussian: round the kernel's own float32 accumulator with the reference rule
        acc = noise.add_(w0.float(), seeds, coefs, KEY, start, "gaussian", 0.999)
        got = noise.add_(w0.clone(), seeds, coefs, KEY, start, "gaussian", 0.999, "stochastic", rs)
        ref = noise_reference.reference_add(
            acc.numpy(), [], [], KEY, start, rounding="stochastic", round_seed=rs, dtype=dtype
        )
        np.testing.assert_array_equal(_bits32(got), _ref_bits32(ref))
        assert not torch.equal(got, acc.to(dtype)) or n < 8  # it does round differently


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_round_rule_on_any_float32(dtype):
    """The kernels' integer rule == the spec's comparison for arbitrary float32 values:
    random bit patterns (subnormals, inf, NaN included), log-uniform magnitudes around the
    format's whole range, and hand-picked edge cases."""
    g = np.random.default_rng(11)
    m = 100_000
    tiny = [2.0**-149, 3 * 2.0**-149, 2.0**-133, 2.0**-126, 2.0**-118, 2.0**-25, 2.0**-24]
    edges = np.array(
        [
            0.0,
            1.0,
            1 + 2.0**-20,
            2 - 2.0**-23,
            2.0**-14 * (1 - 2.0**-12),
            65504,
            65505,
            65519.99,
            65520,
            3.389e38,
            3.3896e38,
            3.4e38,
            np.inf,
            np.nan,
            *tiny,
        ],
        np.float32,
    )
    acc = np.concatenate(
        [
            g.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32).view(np.float32),
            (g.standard_normal(m) * np.exp(g.uniform(-104, 86, m))).astype(np.float32),
            edges,
            -edges,
        ]
    )
    x = g.integers(0, 2**32, acc.size, dtype=np.uint64).astype(np.uint32)
    x[-2 * edges.size :] = g.choice(
        [0, 0xFF, 0x100, 0x7FFFFFFF, 0xFFFFFF00, 0xFFFFFFFF], 2 * edges.size
    )
    out = np.empty(acc.size, np.int16 if dtype == torch.bfloat16 else np.uint16)
    _noise_cpu.stochastic_round(acc, x, out)
    got = torch.from_numpy(out.view(np.int16)).view(dtype)
    ref = noise_reference.reference_stochastic_round(acc, dtype, x)
    np.testing.assert_array_equal(_bits32(got), _ref_bits32(ref))
    # inside the range, where the fraction below the spacing is about uniform, a quarter
    # of the values go to the farther neighbour; specials are rounded to nearest
    near = torch.from_numpy(acc).to(dtype)
    info = torch.finfo(dtype)
    inside = torch.from_numpy((np.abs(acc) > 2 * info.tiny) & (np.abs(acc) < info.max / 2))
    assert 0.23 < (got != near)[inside].float().mean().item() < 0.27
    special = torch.from_numpy(~(np.abs(acc) <= info.max))
    if dtype == torch.bfloat16:  # torch keeps a NaN's sign and payload, the spec does not
        special &= ~torch.from_numpy(np.isnan(acc))
        assert (got[torch.from_numpy(np.isnan(acc))].view(torch.int16) == 0x7FC0).all()
    assert special.sum() >= 6  # inf, beyond the largest finite value
    assert torch.equal(got[special].view(torch.int16), near[special].view(torch.int16))


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_keeps_small_updates(dtype):
    """Updates of 1/16 ulp: nearest loses them all, stochastic keeps them on average.

    w = 1 everywhere; each step adds c*(z_fixed + z_t) (rademacher, |c*(...)| <= 2c =
    ulp(1)/16 < half an ulp below 1), so every element drifts by c*z_fixed per step
    plus a random walk.  The exact (float64) sum of the updates must be matched on
    average: both the mean error and its correlation with the drift direction within 5
    standard errors, and the drift itself (200 c) must be there.
    """
    n, steps = 4096, 200
    ulp = float(torch.finfo(dtype).eps)  # spacing just above 1.0
    c = ulp / 32
    fixed = 2**40 + 17
    near = torch.ones(n, dtype=dtype)
    stoch = torch.ones(n, dtype=dtype)
    exact = np.ones(n)
    for t in range(steps):
        seeds, coefs = [fixed, 1000 + t], [c, c]
        noise.add_(near, seeds, coefs, KEY, dist="rademacher")
        noise.add_(
            stoch, seeds, coefs, KEY, dist="rademacher", rounding="stochastic", round_seed=2**63 + t
        )
        exact += c * noise_reference.reference_z(n, 1000 + t, KEY, dist="rademacher",
                                                 dtype=np.float64)
    z = noise_reference.reference_z(n, fixed, KEY, dist="rademacher", dtype=np.float64)
    exact += steps * c * z
    assert torch.equal(near, torch.ones(n, dtype=dtype))  # nearest loses every update
    err = stoch.double().numpy() - exact
    se = err.std() / np.sqrt(n)
    assert se < 0.2 * steps * c  # the test can tell a lost drift from noise
    assert abs(err.mean()) < 5 * se, (err.mean(), se)
    assert abs((z * err).mean()) < 5 * se, ((z * err).mean(), se)
    drift = (z * (stoch.double().numpy() - 1)).mean()
    assert abs(drift - steps * c) < 5 * (se + c * np.sqrt(steps / n)), (drift, steps * c)
    assert len(stoch.unique()) > 5


def test_stochastic_rounding_is_deterministic():
    w0 = torch.randn(BIG + 10, generator=torch.Generator().manual_seed(4)) * 0.1
    w0 = w0.to(torch.bfloat16)
    args = ([5, 6], [1e-4, -2e-4], KEY)

    def run(w, start=0, rs=99):
        return noise.add_(w, *args, start, "gaussian", 0.999, "stochastic", rs)

    full = run(w0.clone())
    assert torch.equal(run(w0.clone()).view(torch.int16), full.view(torch.int16))
    other = run(w0.clone(), rs=100)
    assert 0.01 < (other != full).float().mean().item() < 0.5
    nearest = noise.add_(w0.clone(), *args, 0, "gaussian", 0.999)
    assert 0.01 < (nearest != full).float().mean().item() < 0.5
    threads = noise.get_num_threads()
    try:
        noise.set_num_threads(1)
        one = run(w0.clone())
        noise.set_num_threads(2)
        two = run(w0.clone())
    finally:
        noise.set_num_threads(threads)
    assert torch.equal(one.view(torch.int16), full.view(torch.int16))
    assert torch.equal(two.view(torch.int16), full.view(torch.int16))
    for a, b in [(0, 1), (1, 2), (3, 9), (5, 4101), (4095, 4097), (1001, BIG + 10), (7, BIG)]:
        part = run(w0[a:b].clone(), a)
        assert torch.equal(part.view(torch.int16), full[a:b].view(torch.int16)), (a, b)
        view = w0.clone()
        run(view[a:b], a)
        assert torch.equal(view[a:b].view(torch.int16), full[a:b].view(torch.int16))
        assert torch.equal(view[:a], w0[:a]) and torch.equal(view[b:], w0[b:])


@pytest.mark.parametrize("dist", DISTS)
def test_stochastic_on_float32_is_nearest(dist):
    w0 = torch.randn(BIG, generator=torch.Generator().manual_seed(6))
    args = ([1, 2], [1e-3, -1e-3], KEY, 3, dist, 0.99)
    want = noise.add_(w0.clone(), *args)
    got = noise.add_(w0.clone(), *args, "stochastic", 12)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    ref = noise_reference.reference_add(w0.numpy(), *args, "stochastic", 12)
    np.testing.assert_array_equal(ref, noise_reference.reference_add(w0.numpy(), *args))


def test_add_rejects_bad_rounding():
    w = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        noise.add_(w, [1], [0.1], 2, rounding="up")
    with pytest.raises(ValueError):
        noise.add_(w, [1], [0.1], 2, rounding="stochastic", round_seed=-1)
    with pytest.raises(ValueError):
        noise.add_(w, [1], [0.1], 2, rounding="stochastic", round_seed=2**64)
    with pytest.raises(ValueError):
        noise.add_(torch.zeros(0), [], [], 2, rounding="Stochastic")
    assert torch.equal(w, torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_in_forked_child():
    parent = _fill(BIG, 3, KEY, 1).numpy()
    pid = os.fork()
    if pid == 0:  # numpy only: torch's OpenMP pool does not survive a fork
        os._exit(0 if np.array_equal(_fill(BIG, 3, KEY, 1).numpy(), parent) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _python(code: str, tmp_path=None, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (from a file under tmp_path if given: Triton's jit
    needs the source of kernels defined in it)."""
    code = textwrap.dedent(code)
    args = ["-c", code]
    if tmp_path is not None:
        script = tmp_path / "check.py"
        script.write_text(code)
        args = [str(script)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path, **env},
    )


def test_import_does_not_import_triton():
    res = _python("import sys, zo2.noise; assert 'triton' not in sys.modules; print('ok')")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


TRITON_INTERPRETER_CHECK = """
import numpy as np
import torch
import triton
import triton.language as tl
from zo2 import noise, _noise_cpu, _noise_triton as T

RTOL = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}

def check(a, b, gauss):
    if gauss:  # float32 results agree within 2e-6, so rounded ones within one ulp
        torch.testing.assert_close(a.float(), b.float(), rtol=RTOL[a.dtype], atol=2e-6)
    else:
        assert torch.equal(a, b), (a, b)

for gauss in (False, True):
    dist = "gaussian" if gauss else "rademacher"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, start in ((3, 1), (1027, 6), (2050, 2**33 + 3)):
            a, b = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            T.fill(a, 2**64 - 3, 123456789, start, gauss)
            check(a, noise.fill(b, 2**64 - 3, 123456789, start, dist), gauss)
            base = torch.randn(n).to(dtype)
            T.combine(a, base, 7, 2**63 + 1, 0.125, start, gauss)
            check(a, noise.combine(b, base, 7, 2**63 + 1, 0.125, start, dist), gauss)
            w1, w2 = base.clone(), base.clone()
            T.add_(w1, [1, 2**40 + 3], [0.5, -0.25], 0.99, 77, start, gauss)
            check(w1, noise.add_(w2, [1, 2**40 + 3], [0.5, -0.25], 77, start, dist, 0.99), gauss)
            # the cached table of the last update is replaced by a new update's, and
            # an update without seeds is the decay alone
            for seeds, coefs in (([2**64 - 1], [3.0]), ([], []), ([1, 2**40 + 3], [0.5, -0.25])):
                T.add_(w1, seeds, coefs, 0.75, 78, start, gauss)
                check(w1, noise.add_(w2, seeds, coefs, 78, start, dist, 0.75), gauss)

# stochastic rounding: the whole add_ kernel (rademacher: the float32 accumulators are
# equal, so the rounded results must be too), with tiny, huge and special values
for dtype in (torch.bfloat16, torch.float16):
    big = torch.finfo(dtype).max
    for n, start, decay in ((3, 1, 0.99), (1027, 6, 2.0**-120), (2050, 2**33 + 3, 1.0)):
        base = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
        base[:3] = torch.tensor([big, -big, float("inf")])[:n]
        base[3:6] = torch.tensor([float("nan"), 1.0, -0.0])[: max(0, n - 3)]
        base = base.to(dtype)
        for gauss in (False, True):
            dist = "gaussian" if gauss else "rademacher"
            w1, w2 = base.clone(), base.clone()
            args = ([1, 2**40 + 3], [3e-4, -1e-4])
            T.add_(w1, *args, decay, 77, start, gauss, True, 2**64 - 5)
            noise.add_(w2, *args, 77, start, dist, decay, "stochastic", 2**64 - 5)
            if gauss:  # the accumulators agree within 2e-6, so the results within an ulp
                torch.testing.assert_close(
                    w1.float(), w2.float(), rtol=RTOL[dtype], atol=2e-6, equal_nan=True
                )
            else:
                assert torch.equal(w1.view(torch.int16), w2.view(torch.int16)), (dtype, n)

# stochastic rounding: the store function on arbitrary float32 values vs the numba one
@triton.jit
def probe(src, words, dst, n, BF16: tl.constexpr, B: tl.constexpr):
    pos = tl.program_id(0) * B + tl.arange(0, B)
    mask = pos < n
    v = tl.load(src + pos, mask=mask, other=0.0)
    x = tl.load(words + pos, mask=mask, other=0).to(tl.uint32, bitcast=True)
    T._store_sr(dst, pos, v, mask, x, BF16)

g = np.random.default_rng(5)
m = 1 << 15
acc = np.concatenate([
    g.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32).view(np.float32),
    (g.standard_normal(m) * np.exp(g.uniform(-104, 86, m))).astype(np.float32),
])
x = g.integers(0, 2**32, acc.size, dtype=np.uint64).astype(np.uint32)
for dtype, bits in ((torch.bfloat16, np.int16), (torch.float16, np.uint16)):
    want = np.empty(acc.size, bits)
    _noise_cpu.stochastic_round(acc, x, want)
    out = torch.empty(acc.size, dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    src, words = torch.from_numpy(acc), torch.from_numpy(x.view(np.int32))
    probe[(acc.size // 1024,)](src, words, out, acc.size, dtype == torch.bfloat16, 1024)
    got = out.view(torch.int16).numpy()
    nan = np.isnan(acc)  # NaN payloads of the fp16 conversion are not specified
    assert np.array_equal(got[~nan], want.view(np.int16)[~nan]), dtype
    assert torch.isnan(out.view(dtype)[torch.from_numpy(nan)].float()).all()
print("triton-interpreter-ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_match_numba_in_interpreter(tmp_path):
    res = _python(TRITON_INTERPRETER_CHECK, tmp_path, TRITON_INTERPRET="1")
    assert res.returncode == 0 and "triton-interpreter-ok" in res.stdout, res.stderr[-3000:]


SEGMENTS_CHECK = """
import torch
from zo2 import noise, _noise_triton as T

# one launch over a block's segments == one add_ launch per segment, bit for bit: the
# same program runs the same elements (unaligned starts, gaps, decay on or off)
segments = [(0, 5, 11, 0, True), (8, 1027, 2**64 - 7, 6, False), (1100, 3000, 5, 2**33 + 3, True),
            (4160, 1, 9, 1, True)]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for gauss in (False, True):
        for stoch in (False, True):
            for segs in (segments, segments[2:3]):
                base = (torch.randn(4200, generator=torch.Generator().manual_seed(1)) * 1e-2)
                one, many = base.to(dtype), base.to(dtype)
                args = ([1, 2**40 + 3], [3e-4, -1e-4])
                T.add_segments_(one, segs, *args, 0.99, gauss, stoch, 2**64 - 5)
                for off, n, key, start, decays in segs:
                    T.add_(many[off: off + n], *args, 0.99 if decays else 1.0, key, start,
                           gauss, stoch, 2**64 - 5)
                assert torch.equal(one.view(torch.int16 if dtype != torch.float32 else
                                            torch.int32), many.view(torch.int16 if dtype !=
                                            torch.float32 else torch.int32)), (dtype, gauss)
                # the CPU path of the public function: add_ per segment (numba)
                cpu, ref = base.to(dtype), base.to(dtype)
                dist = "gaussian" if gauss else "rademacher"
                rounding = "stochastic" if stoch else "nearest"
                noise.add_segments_(cpu, segs, *args, dist, 0.99, rounding, 7)
                for off, n, key, start, decays in segs:
                    noise.add_(ref[off: off + n], *args, key, start, dist,
                               0.99 if decays else 1.0, rounding, 7)
                assert torch.equal(cpu, ref)
print("segments-ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_one_launch_over_segments_equals_a_launch_per_segment_in_interpreter(tmp_path):
    res = _python(SEGMENTS_CHECK, tmp_path, TRITON_INTERPRET="1")
    assert res.returncode == 0 and "segments-ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compile_for_cuda_without_fp_fusion():
    """Lower the kernels to PTX/cubin for sm_90 (no GPU needed) as a launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from zo2 import _noise_triton as T

    names = ("n", "q_lo", "shift", "k0", "k1", "p0", "p1", "rk0", "rk1", "n_seeds")
    i32 = dict.fromkeys(names, "i32")
    cases = [
        (T._fill_kernel, {"out": "*fp32"}, {"OUT_BF16": False}),
        (
            T._combine_kernel,
            {"out": "*i16", "base": "*fp16", "coef": "fp32"},
            {"OUT_BF16": True, "BASE_BF16": False},
        ),
        (
            T._add_kernel,
            {"w": "*fp32", "table": "*i32", "decay": "fp32"},
            {"OUT_BF16": False, "STOCH": False},
        ),
        (
            T._add_kernel,
            {"w": "*i16", "table": "*i32", "decay": "fp32"},
            {"OUT_BF16": True, "STOCH": True},
        ),
        (
            T._add_kernel,
            {"w": "*fp16", "table": "*i32", "decay": "fp32"},
            {"OUT_BF16": False, "STOCH": True},
        ),
        (
            T._add_segments_kernel,
            {"w": "*i16", "table": "*i32", "decay": "fp32", "segs": "*i64", "n_segs": "i32"},
            {"OUT_BF16": True, "STOCH": True},
        ),
    ]
    for fn, pointers, consts in cases:
        consts = {"GAUSS": True, "BLOCK": T.BLOCK, **consts}
        sig = {a: pointers.get(a, i32.get(a, "constexpr")) for a in fn.arg_names}
        src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}
        )
        ptx = kernel.asm["ptx"]
        assert "mul.hi.u32" in ptx and "fma.rn.f32" in ptx and "sqrt.rn.f32" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dist, dtype):
    n, start = 3 * BIG + 5, 2**33 + 3
    rtol = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    atol = 0.0 if dist == "rademacher" else GAUSS_ATOL
    cpu = _fill(n, 17, KEY, start, dist, dtype)
    gpu = noise.fill(torch.empty(n, dtype=dtype, device="cuda"), 17, KEY, start, dist).cpu()
    torch.testing.assert_close(gpu.float(), cpu.float(), rtol=rtol, atol=atol)
    w = torch.randn(n).to(dtype)
    wg = noise.add_(w.cuda(), [3, 4], [0.1, -0.2], KEY, start, dist, 0.9).cpu()
    wc = noise.add_(w, [3, 4], [0.1, -0.2], KEY, start, dist, 0.9)
    torch.testing.assert_close(wg.float(), wc.float(), rtol=rtol, atol=atol)
