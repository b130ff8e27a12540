"""The native decode kernels against float64 references, and their XLA fallbacks likewise."""

import contextlib
import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import kernels, sampling
from spark_model.kv_cache import blocked_attention, cache_length, cached_attention


def test_kernel_builds_where_a_compiler_exists():
    if jax.default_backend() != "cpu" or kernels._compiler() is None:
        pytest.skip("no CPU backend or no C++ compiler: the XLA attention is used")
    assert kernels.available(), kernels.status()


def _direct(q_btnh, k_rksh, v_rksh, pos_bt):
    """Softmax over each query's positions 0..p in float64, head by head."""
    b_n, t_n, n_heads, h = q_btnh.shape
    g = n_heads // k_rksh.shape[1]
    out = np.zeros(q_btnh.shape)
    for b in range(b_n):
        for t in range(t_n):
            p = pos_bt[b][t]
            for n in range(n_heads):
                keys = k_rksh[b, n // g, :p + 1].astype(np.float64)
                s = keys @ q_btnh[b, t, n] / math.sqrt(h)
                w = np.exp(s - s.max())
                out[b, t, n] = (w / w.sum()) @ v_rksh[b, n // g, :p + 1]
    return out


# Rows at span edges (the kernel's units are multiples of 64 positions, at most 1,024), a
# lone first position, short ones and a long one (split over threads); the cache has a spare
# row past the queries.
@pytest.mark.parametrize("h, g", [(64, 2), (64, 3), (16, 3)])  # compiled-in shapes, generic
@pytest.mark.parametrize("path", ["native", "xla"])
def test_decode_step_matches_direct_softmax(path, h, g):
    if path == "native" and not kernels.usable(jnp.zeros((), jnp.float32),
                                                jnp.zeros((), jnp.float32)):
        pytest.skip(kernels.status())
    k_heads = 2
    pos = [0, 63, 64, 255, 1023, 1024, 1025, 9_000]
    rows, s = len(pos) + 1, cache_length(12_000)
    rng = np.random.default_rng(0)
    k = rng.normal(size=(rows, k_heads, s, h)).astype(np.float32)
    v = rng.normal(size=(rows, k_heads, s, h)).astype(np.float32)
    for b, p in enumerate(pos):  # garbage past each row's position must never leak in
        k[b, :, p + 1:] = 1e3
        v[b, :, p + 1:] = 1e6
    q = rng.normal(size=(len(pos), 1, k_heads * g, h)).astype(np.float32) * 3
    pos_bt = np.asarray(pos, np.int32)[:, None]
    fn = cached_attention if path == "native" else blocked_attention
    ours = np.asarray(jax.jit(fn)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  jnp.asarray(pos_bt)))
    np.testing.assert_allclose(ours, _direct(q, k, v, pos_bt), atol=1e-4, rtol=1e-4)


# Prefill chunks: ragged query counts (not whole 16-query units), sequences of one batch
# starting at different positions (one continuing past earlier positions, as a shared
# context does), G from 1 to 16, compiled-in and generic head dims, keys past the
# positions filled with garbage that must never leak in; one case runs on both threads.
@pytest.mark.parametrize("t, starts, k_heads, g, h", [
    (1 + 16 * 2, [0, 70], 2, 2, 64), (7, [0], 1, 16, 16), (20, [33, 0, 300], 1, 1, 128),
    (40, [5], 3, 3, 48), (300, [0], 3, 3, 64)])
def test_prefill_chunk_attention_matches_direct_softmax(t, starts, k_heads, g, h):
    if not kernels.usable(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)):
        pytest.skip(kernels.status())
    rng = np.random.default_rng(t + h)
    rows, s = len(starts) + 1, cache_length(max(starts) + t)
    k = rng.normal(size=(rows, k_heads, s, h)).astype(np.float32)
    v = rng.normal(size=(rows, k_heads, s, h)).astype(np.float32)
    pos_bt = np.stack([np.arange(a, a + t) for a in starts]).astype(np.int32)
    for b, a in enumerate(starts):
        k[b, :, a + t:] = 1e3
        v[b, :, a + t:] = 1e6
    q = rng.normal(size=(len(starts), t, k_heads * g, h)).astype(np.float32) * 3
    args = [jnp.asarray(a) for a in (q, k, v, pos_bt)]
    assert "spark_prefill_attention" in jax.jit(cached_attention).lower(*args).as_text()
    ours = np.asarray(jax.jit(cached_attention)(*args))
    want = _direct(q, k, v, pos_bt)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=2e-5)
    xla = np.asarray(jax.jit(blocked_attention)(*args))  # the XLA path, the same rounding
    assert np.abs(ours - want).max() <= 2 * np.abs(xla - want).max() + 1e-6


def test_build_failure_falls_back_with_a_reason(monkeypatch, tmp_path):
    """A broken compiler leaves the XLA path in place and says why."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SPARK_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.warns(UserWarning, match="unavailable"):
        assert not kernels.available()
    assert "internal compiler error" in kernels.status()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind


def _native_or_skip():
    if not kernels.usable(jnp.zeros((), jnp.float32)):
        pytest.skip(kernels.status())


# Row counts 1..MAX_ROWS go native, MAX_ROWS + 1 falls back to the XLA dot; K and N off the
# kernels' 8-row and 32-column blocks, and weights both above and below the size that runs
# serially.
@pytest.mark.parametrize("m", [1, 3, kernels.MAX_ROWS, kernels.MAX_ROWS + 1])
@pytest.mark.parametrize("k, n", [(256, 768), (771, 130), (8, 8)])
def test_linear_matches_float64(m, k, n):
    _native_or_skip()
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w_kn = rng.normal(size=(k, n)).astype(np.float32)
    w2 = rng.normal(size=(k, 3)).astype(np.float32)
    ref = x.astype(np.float64) @ w_kn
    tol = dict(atol=1e-4 * math.sqrt(k), rtol=1e-5)
    got = jax.jit(kernels.linear)(x, w_kn)
    np.testing.assert_allclose(np.asarray(got), ref, **tol)
    got_t = jax.jit(lambda x, w: kernels.linear(x, w, transposed=True))(x, w_kn.T.copy())
    np.testing.assert_allclose(np.asarray(got_t), ref, **tol)
    many = jax.jit(kernels.linear_many)(x, [w_kn, w2])
    np.testing.assert_allclose(np.asarray(many[0]), ref, **tol)
    np.testing.assert_allclose(np.asarray(many[1]), x.astype(np.float64) @ w2, **tol)


def test_linear_gradient_is_the_xla_gradient():
    _native_or_skip()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=(64, n)), jnp.float32) for n in (32, 16)]
    wt = jnp.asarray(rng.normal(size=(48, 64)), jnp.float32)

    def loss(x, ws, wt):
        ys = kernels.linear_many(x, ws) + [kernels.linear(x, wt, transposed=True)]
        return sum(jnp.sum(jnp.tanh(y / 8)) for y in ys)

    def traced(fn):  # a fresh function each time: no trace is reused from a cache
        return str(jax.make_jaxpr(lambda *a: fn(*a))(x, ws, wt))

    native = jax.grad(loss, argnums=(0, 1, 2))(x, ws, wt)
    assert "spark_matvec" in traced(loss)
    with kernels.disabled():  # traced inside: plain XLA dots
        assert "ffi_call" not in traced(loss)
        xla = jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2))(x, ws, wt)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_argmax_matches_numpy_on_ties_infinities_and_nans():
    rows = np.array([
        [1.0, 3.0, 3.0, 2.0],            # tie: the first maximum
        [-np.inf, -np.inf, -np.inf, -np.inf],
        [1.0, np.inf, 2.0, np.inf],
        [1.0, np.nan, 5.0, np.nan],      # NaN: the first NaN, as numpy and jnp.argmax
        [0.5, -1.0, 7.0, 6.9],
        [-0.0, 0.0, -1.0, -2.0],         # -0 == +0: the first of them
        [-3.0, -2.0, -2.0, -5.0],
        [np.nan, 1.0, np.inf, -np.inf],
    ], np.float32)
    rng = np.random.default_rng(0)
    big = rng.normal(size=(8, 8192)).astype(np.float32)
    big[1, [77, 5000]] = 9.0       # a tie far apart
    big[2, 8191] = 9.0             # the last element
    big[3, [100, 6000]] = np.nan   # NaNs past the first span
    big[4, 4000] = -np.nan         # a NaN with the sign bit set
    big[5] = -np.inf
    paths = [("native" if kernels.usable(jnp.asarray(big)) else "xla", contextlib.nullcontext)]
    paths.append(("xla", kernels.disabled))
    for name, ctx in paths:
        with ctx():
            fn = jax.jit(lambda x: sampling.argmax(x))  # traced here, inside the context
            assert ("spark_argmax" in str(jax.make_jaxpr(fn)(big))) == (name == "native")
            for x in (rows, big, big[:1]):
                assert np.asarray(fn(x)).tolist() == np.argmax(x, -1).tolist(), name


_SUBNORMALS = r"""
import sys, threading
import numpy as np
import jax, jax.numpy as jnp
from spark_model import kernels

if not kernels.available():
    print("unavailable:", kernels.status()); sys.exit(3)
x = jnp.ones((1, 64), jnp.float32)
w = jnp.ones((64, 32), jnp.float32)
q = jnp.ones((1, 1, 1, 64), jnp.float32)
kv = jnp.ones((1, 1, 8, 64), jnp.float32)
jax.block_until_ready([kernels.linear(x, w), kernels.argmax(x),
                       kernels.decode_attention(q, kv, kv, jnp.array([3]))])


def survive():
    tiny32 = np.float32(1e-39)  # subnormal in float32
    # (XLA's own computations flush subnormals whatever the process mode: not checked.)
    return [float(tiny32 * np.float32(1)) != 0.0,  # NumPy
            5e-324 * 1.0 == 5e-324]  # Python float (the smallest subnormal double)


out = []
t = threading.Thread(target=lambda: out.append(survive()))  # a thread started after loading
t.start(); t.join()
print(survive(), out[0])
sys.exit(0 if all(survive()) and all(out[0]) else 1)
"""


def test_loading_the_kernels_keeps_subnormal_floats():
    """A library must not change the importing program's floating-point mode: loading a
    library linked with -ffast-math sets flush-to-zero for the whole process (GCC bug
    55522). Run in a fresh process, after the kernels are loaded and used once each."""
    if jax.default_backend() != "cpu" or kernels._compiler() is None:
        pytest.skip("no CPU backend or no C++ compiler: nothing native is loaded")
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _SUBNORMALS], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
