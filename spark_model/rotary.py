"""Sine and cosine of rotary angles (position x frequency), exact in the angle, vectorised.

Why not `jnp.sin(positions * freqs)`: on CPU, XLA lowers sin and cos to scalar library
calls, and it recomputes them inside every layer's fusions (the query rearranged for the
attention kernel, the key written into the cache) for every element of every head. SmolLM2
at q8_0 took 660-678 ms to first token on a 1,000-token prompt that way, 514-517 ms with the
sine and cosine replaced by cheap (wrong) arithmetic, and 501-571 ms with this module's
kernel (/tmp timing runs of eval.bench_decode.ttft). Also, the angle rounded to float32 is
off by up to 2^-7 rad near position 2^17 (2.5e-4 already below position 5,000).

Method: the angle in turns, position x (freq / 2 pi), is formed modulo 1 in 32-bit fixed
point with integer arithmetic only (wrapping uint32 products, which vectorise): the
constant's fraction is held as four 16-bit limbs (64 bits) and the position as two 12-bit
halves, so every partial product is exact below 2^28 and shifted into place; what the
shifts drop is below 3 units of 2^-32 turn (5e-9 rad). The nearest quarter turn is split
off, and the rest (|x| <= pi/4, as float32) goes through short polynomials for sin and cos
(the classic single-precision minimax ones, within about 1e-7 on that interval); the
quadrant then swaps and negates them. Positions must lie in [0, 2^24).

On CPU the native kernel (kernels/rotary.cc) computes it: XLA fuses these integer ops into
their consumers as it did sin and cos (an optimization barrier does not stop it), and they
then cost about as much as the library calls did.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spark_model import kernels

_SIN = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)


@functools.lru_cache(maxsize=32)
def turn_limbs(freqs: tuple[float, ...]) -> np.ndarray:
    """(4, H/2) uint32: the fraction of each freq / (2 pi), 16 bits per row, most
    significant first (the whole turns of a position x freq do not matter)."""
    out = np.zeros((4, len(freqs)), np.uint32)
    for j, f in enumerate(freqs):
        turns = f / (2 * math.pi)
        frac = int(round((turns - math.floor(turns)) * 2.0 ** 64)) % (1 << 64)
        for i in range(4):
            out[i, j] = (frac >> (48 - 16 * i)) & 0xFFFF
    out.flags.writeable = False
    return out


def _shift(x: jax.Array, e: int) -> jax.Array:
    """x * 2^e modulo 2^32 (uint32; a negative e drops the low bits)."""
    if e >= 32 or e <= -32:
        return jnp.zeros_like(x)
    return x << e if e >= 0 else x >> -e


def sin_cos(positions: jax.Array, freqs: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """sin and cos of positions[..., None] * freqs (float64 frequencies, shape (H/2,)),
    each (..., H/2) float32: from the native kernel where it runs (kernels/rotary.cc, the
    same steps), else in XLA ops."""
    limbs = turn_limbs(tuple(float(f) for f in np.asarray(freqs, np.float64)))
    if kernels.usable():
        shape = positions.shape + (limbs.shape[1],)
        sin, cos = kernels.rotary(positions.reshape(-1), limbs)
        return sin.reshape(shape), cos.reshape(shape)
    return _sin_cos_xla(positions, limbs)


def _sin_cos_xla(positions: jax.Array, limbs: np.ndarray) -> tuple[jax.Array, jax.Array]:
    p = positions.astype(jnp.uint32)[..., None]
    halves = ((p >> 12, 12), (p & 0xFFF, 0))  # position = hi * 2^12 + lo
    u = jnp.zeros(p.shape[:-1] + (limbs.shape[1],), jnp.uint32)  # turns, units of 2^-32
    for i in range(4):  # limb i is worth 2^(-16 (i + 1)) turn
        c = jnp.asarray(limbs[i])
        for half, scale in halves:
            u = u + _shift(half * c, 32 - 16 * (i + 1) + scale)
    quarter = (u + (1 << 29)) >> 30  # nearest quarter turn, 0..3 (4 wraps to 0)
    rest = (u - (quarter << 30)).astype(jnp.int32)  # in [-2^29, 2^29)
    x = rest.astype(jnp.float32) * jnp.float32(2 * math.pi / 2.0 ** 32)
    x2 = x * x
    s = x + x * x2 * (_SIN[0] + x2 * (_SIN[1] + x2 * _SIN[2]))
    c = 1.0 - 0.5 * x2 + x2 * x2 * (_COS[0] + x2 * (_COS[1] + x2 * _COS[2]))
    q = (quarter & 3).astype(jnp.int32)
    sin = jnp.where(q == 0, s, jnp.where(q == 1, c, jnp.where(q == 2, -s, -c)))
    cos = jnp.where(q == 0, c, jnp.where(q == 1, -s, jnp.where(q == 2, -c, s)))
    return sin, cos
