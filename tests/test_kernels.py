"""The native decode attention against a direct softmax, and its XLA fallback likewise."""

import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import kernels
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


# Rows at chunk edges (255/256/257 for the kernel's 256-position units), a lone first
# position and a long one; the cache has a spare row past the queries.
@pytest.mark.parametrize("h", [64, 16])  # a compiled-in head dim and the generic path
@pytest.mark.parametrize("path", ["native", "xla"])
def test_decode_step_matches_direct_softmax(path, h):
    if path == "native" and not kernels.usable(jnp.zeros((), jnp.float32),
                                                jnp.zeros((), jnp.float32)):
        pytest.skip(kernels.status())
    k_heads, g = 2, 2
    pos = [0, 255, 256, 257, 9_000]
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
