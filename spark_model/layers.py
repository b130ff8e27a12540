"""Small building blocks: RMSNorm, rotary position embedding with Llama 3.1 scaling, and the
products every projection uses (float weights, or packed ones: spark_model/quant.py)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from spark_model import kernels, rotary
from spark_model.config import RopeScaling
from spark_model.quant import PackedWeight

# A weight as the products take it: a float array, or a packed (N out, K in) matrix.
Weight = jax.Array | PackedWeight


def as_weight(param: nnx.Variable, dtype, pattern: str | None = None) -> Weight:
    """A parameter ready for `linear`: a float one cast to `dtype` (and rearranged by the
    einops `pattern`, if given), a packed one as it is (its layout is always (N, K))."""
    w = param.get_value()
    if isinstance(w, PackedWeight):
        return w
    w = w.astype(dtype)
    return rearrange(w, pattern) if pattern else w


def linear(x_mk: jax.Array, w: Weight, *, transposed: bool = False,
           preferred_element_type=None) -> jax.Array:
    """x (M, K) times a weight: float (K, N), float (N, K) when `transposed`, or packed
    (N, K) whatever `transposed` says; (M, N).

    Float weights go to `kernels.linear`, packed ones to `kernels.packed_linear` (native for
    a decode step's few rows on CPU, else dequantize-then-dot). A packed product is float32;
    it is returned in x's dtype unless `preferred_element_type` is given.
    """
    if isinstance(w, PackedWeight):
        y = kernels.packed_linear(x_mk, w)
        return y.astype(preferred_element_type or x_mk.dtype)
    return kernels.linear(x_mk, w, transposed=transposed,
                          preferred_element_type=preferred_element_type)


def linear_many(x_mk: jax.Array, ws: list[Weight]) -> list[jax.Array]:
    """[linear(x, w) for w in ws] for float (K, N_i) or packed (N_i, K) weights: all float
    or all packed ones together in one native call that reads x once."""
    if not any(isinstance(w, PackedWeight) for w in ws):
        return kernels.linear_many(x_mk, ws)
    if all(isinstance(w, PackedWeight) for w in ws):
        return [y.astype(x_mk.dtype) for y in kernels.packed_linear_many(x_mk, ws)]
    return [linear(x_mk, w) for w in ws]


def rows_linear(x_btk: jax.Array, w: Weight, *, transposed: bool = False,
                preferred_element_type=None) -> jax.Array:
    """(B, T, K) times a (K, N) weight, or a (N, K) one when `transposed` or packed: (B, T, N).

    One 2-D product over the B*T rows (`linear`): native threads for a decode step's few rows
    on CPU, an XLA dot otherwise.
    """
    y = linear(rearrange(x_btk, "b t k -> (b t) k"), w, transposed=transposed,
               preferred_element_type=preferred_element_type)
    return rearrange(y, "(b t) n -> b t n", b=x_btk.shape[0])


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned per-channel scale (statistics in f32)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))  # (D,)

    def __call__(self, x: jax.Array) -> jax.Array:
        if kernels.row_exact_active() and x.ndim == 3 and x.shape[1] > 1:
            # Speculative verification: XLA may reduce a (B, T, D) array's rows in another
            # order than a decode step's (B, 1, D) (it did for D = 576: the first and last
            # rows' last bits differed), so norm one position at a time, as the step does.
            return jnp.swapaxes(jax.lax.map(lambda x_bd: self._norm(x_bd[:, None])[:, 0],
                                            jnp.swapaxes(x, 0, 1)), 0, 1)
        return self._norm(x)

    def _norm(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv).astype(x.dtype) * self.scale[...].astype(x.dtype)


@functools.lru_cache(maxsize=32)
def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Angular frequency of each rotary pair, shape (H/2,), float64.

    With llama3 `scaling`, frequencies follow Llama 3.1: wavelengths shorter than
    original/high_freq_factor are kept, longer than original/low_freq_factor are
    divided by `factor`, and the band between is interpolated smoothly; linear scaling
    divides them all by `factor`. Computed in NumPy at trace time: they are constants
    of the model, not traced values.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None or scaling.kind == "linear":
        freqs = freqs if scaling is None else freqs / scaling.factor
        freqs.flags.writeable = False
        return freqs
    wavelen = 2 * math.pi / freqs
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    out = np.where(wavelen < high_wavelen, freqs,
                   np.where(wavelen > low_wavelen, freqs / scaling.factor, blended))
    out.flags.writeable = False  # cached: callers must not mutate it
    return out


def apply_rope(x_bt_h: jax.Array, positions_bt: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Rotate pairs (i, i + H/2) of the last axis by position * frequency.

    x: (B, T, heads, H); positions: (B, T) integer in [0, 2^24). The half-split pairing is
    the one Hugging Face's Llama uses, so weights export without a permutation. The angles'
    sine and cosine come from `spark_model.rotary`: exact in the angle (a float32 angle
    would be off by up to 2^-7 rad near position 2^17), within about 1e-7.
    """
    return rotate(x_bt_h, *rotary.sin_cos(positions_bt, freqs))


def rotate(x_bt_h: jax.Array, sin_bt: jax.Array, cos_bt: jax.Array) -> jax.Array:
    """`apply_rope` with the angles' sine and cosine (B, T, H/2) already computed (once for
    a layer's queries and keys)."""
    sin, cos = sin_bt[:, :, None, :], cos_bt[:, :, None, :]  # (B, T, 1, H/2)
    x1, x2 = jnp.split(x_bt_h.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bt_h.dtype)
