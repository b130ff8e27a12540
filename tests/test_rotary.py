"""Rotary sine and cosine (spark_model/rotary.py and kernels/rotary.cc) against float64
NumPy on exact angles, and the rotation against the float64 reference Llama's."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import _rope
from spark_model import kernels, rotary
from spark_model.config import RopeScaling
from spark_model.layers import apply_rope, rope_frequencies

FREQS = [(64, 100_000.0, None), (128, 500_000.0, RopeScaling(kind="llama3", factor=8.0)),
         (16, 10_000.0, None)]


def _positions():
    rng = np.random.default_rng(0)  # small ones, quarter-turn edges by chance, the largest
    return np.concatenate([np.arange(2048), rng.integers(0, 1 << 24, 4096),
                           [131_071, 131_072, (1 << 24) - 1]]).astype(np.int32)


@pytest.mark.parametrize("path", ["native", "xla"])
@pytest.mark.parametrize("head_dim, theta, scaling", FREQS)
def test_sin_cos_match_float64_on_exact_angles(path, head_dim, theta, scaling):
    if path == "native" and not kernels.usable():
        pytest.skip(kernels.status())
    freqs = rope_frequencies(head_dim, theta, scaling)
    pos = _positions()
    with (kernels.disabled() if path == "xla" else contextlib.nullcontext()):
        sin, cos = jax.jit(lambda p: rotary.sin_cos(p, freqs))(jnp.asarray(pos[None]))
    angles = pos[:, None].astype(np.float64) * freqs[None, :]
    assert sin.shape == cos.shape == (1, len(pos), head_dim // 2)
    # A float32 angle would be off by up to 2^-7 rad at the largest positions here.
    np.testing.assert_allclose(np.asarray(sin)[0], np.sin(angles), rtol=0, atol=2e-7)
    np.testing.assert_allclose(np.asarray(cos)[0], np.cos(angles), rtol=0, atol=2e-7)


def test_native_and_xla_agree_and_rope_matches_the_reference():
    freqs = rope_frequencies(64, 100_000.0, None)
    pos = _positions()[None, :3000]
    x = np.random.default_rng(1).normal(size=(1, pos.shape[1], 3, 64)).astype(np.float32)
    ref = np.stack([_rope(x[0, :, n].astype(np.float64), pos[0], freqs) for n in range(3)], 1)
    outs = []
    for ctx in ([kernels.disabled()] + ([contextlib.nullcontext()] if kernels.usable() else [])):
        with ctx:
            outs.append(np.asarray(jax.jit(lambda x, p: apply_rope(x, p, freqs))(
                jnp.asarray(x), jnp.asarray(pos))))
    for out in outs:
        np.testing.assert_allclose(out[0], ref, rtol=0, atol=2e-6)
    if len(outs) == 2:
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)
