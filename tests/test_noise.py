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

from zo2 import _noise_cpu, noise

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
    ref = noise.philox4x32_reference(np.array([ctr], dtype=np.uint32), key)[0]
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
        _check(got, noise.reference_fill(n, seed, pkey, start, dist), dist)


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
    _check(got, noise.reference_add(w0.numpy(), seeds, coefs, KEY, 5, dist, 0.98), dist)
    got = noise.add_(w0.clone(), [], [], KEY, decay=0.5)
    assert torch.equal(got, w0 * 0.5)


@pytest.mark.parametrize("dist", DISTS)
def test_combine(dist):
    base = torch.randn(BIG, generator=torch.Generator().manual_seed(3))
    got = noise.combine(torch.empty(BIG), base, 4, KEY, 1e-3, 11, dist)
    _check(got, noise.reference_combine(base.numpy(), 4, KEY, 1e-3, 11, dist), dist)
    assert torch.equal(noise.combine(torch.empty(BIG), base, 4, KEY, 0.0, 11, dist), base)
    inplace = base.clone()
    assert torch.equal(noise.combine(inplace, inplace, 4, KEY, 1e-3, 11, dist), got)


def test_gaussian_accuracy_vs_float64():
    n = 1_000_000
    got = _fill(n, 31, KEY, 1).numpy().astype(np.float64)
    ref = noise.reference_z(n, 31, KEY, 1, dtype=np.float64)
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_in_forked_child():
    parent = _fill(BIG, 3, KEY, 1).numpy()
    pid = os.fork()
    if pid == 0:  # numpy only: torch's OpenMP pool does not survive a fork
        os._exit(0 if np.array_equal(_fill(BIG, 3, KEY, 1).numpy(), parent) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_import_does_not_import_triton():
    res = _python("import sys, zo2.noise; assert 'triton' not in sys.modules; print('ok')")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


TRITON_INTERPRETER_CHECK = """
import torch
from zo2 import noise, _noise_triton as T

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
print("triton-interpreter-ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_match_numba_in_interpreter():
    res = _python(TRITON_INTERPRETER_CHECK, TRITON_INTERPRET="1")
    assert res.returncode == 0 and "triton-interpreter-ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compile_for_cuda_without_fp_fusion():
    """Lower the kernels to PTX/cubin for sm_90 (no GPU needed) as a launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from zo2 import _noise_triton as T

    i32 = dict.fromkeys(("n", "q_lo", "shift", "k0", "k1", "p0", "p1", "n_seeds"), "i32")
    cases = [
        (T._fill_kernel, {"out": "*fp32"}, {"OUT_BF16": False}),
        (
            T._combine_kernel,
            {"out": "*i16", "base": "*fp16", "coef": "fp32"},
            {"OUT_BF16": True, "BASE_BF16": False},
        ),
        (
            T._add_kernel,
            {"w": "*fp32", "keys": "*i32", "coefs": "*fp32", "decay": "fp32"},
            {"OUT_BF16": False},
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
