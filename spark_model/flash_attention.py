"""Causal self-attention in memory linear in the sequence, with its own gradient.

`flash_attention(q, k, v)` is the same function as `modules.causal_attention` for a whole
sequence (query i sees keys <= i), computed tile by tile: queries in blocks of `block` rows
meet keys block by block up to the diagonal with a running (online) softmax, so only one
(block x block) score tile per kv head exists at a time and tiles above the diagonal are
never formed. The forward keeps each row's log-sum-exp; the backward recomputes every
tile's probabilities from it instead of storing them (a custom VJP), in two sweeps: one
over query blocks for dq, one over key blocks for dk and dv. Memory is O(T * H) per head
in both directions, so it serves long-context scoring and training alike.

Shapes as in `modules`: q (B, T, N, H), k and v (B, T, K, H), N = K * G (grouped-query
attention); statistics and accumulators in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange

DEFAULT_BLOCK = 512


def _blocks(q, k, v, block):
    """Pad T to whole blocks and put the block index first:
    q (nb, B, K, G, L, H), k and v (nb, B, K, L, H), all float32."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    pad = -t % block
    if pad:  # padded keys sit after every real query, so no real query ever sees them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    f32 = jnp.float32
    return (rearrange(q.astype(f32), "b (i l) (k g) h -> i b k g l h", l=block, k=kv),
            rearrange(k.astype(f32), "b (j l) k h -> j b k l h", l=block),
            rearrange(v.astype(f32), "b (j l) k h -> j b k l h", l=block))


def _scores(qi, kj, i, j, block, scale):
    """One tile of scaled scores (B, K, G, Lq, Lk); keys after their query are -inf."""
    s = jnp.einsum("bkglh,bksh->bkgls", qi, kj) * scale
    diag = jnp.arange(block)[:, None] >= jnp.arange(block)[None, :]
    return jnp.where((j < i) | diag, s, -jnp.inf)


def _forward(q, k, v, block):
    """(o (B, T, N, H) in q's dtype, lse (nb, B, K, G, L) float32)."""
    b, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    qb, kb, vb = _blocks(q, k, v, block)

    def query_block(_, i):
        qi = qb[i]

        def key_block(j, carry):
            m, l_sum, acc = carry
            s = _scores(qi, kb[j], i, j, block, scale)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            return (m_new, l_sum * correction + p.sum(axis=-1),
                    acc * correction[..., None] + jnp.einsum("bkgls,bksh->bkglh", p, vb[j]))

        init = (jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
                jnp.zeros(qi.shape[:-1], jnp.float32), jnp.zeros(qi.shape, jnp.float32))
        m, l_sum, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        return None, (acc / l_sum[..., None], m + jnp.log(l_sum))

    _, (o, lse) = jax.lax.scan(query_block, None, jnp.arange(qb.shape[0]))
    o = rearrange(o, "i b k g l h -> b (i l) (k g) h")[:, :t]
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = DEFAULT_BLOCK
                    ) -> jax.Array:
    """Causal grouped-query self-attention, (B, T, N, H); see the module docstring."""
    return _forward(q, k, v, block)[0]


def _fwd(q, k, v, block):
    o, lse = _forward(q, k, v, block)
    return o, (q, k, v, o, lse)


def _bwd(block, res, do):
    q, k, v, o, lse = res
    b, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    qb, kb, vb = _blocks(q, k, v, block)
    dob, _, _ = _blocks(do, k, v, block)
    ob, _, _ = _blocks(o, k, v, block)
    delta = jnp.sum(dob * ob, axis=-1)  # (nb, B, K, G, L): rowsum(dO * O)
    nb = qb.shape[0]

    def probs_and_ds(i, j):
        p = jnp.exp(_scores(qb[i], kb[j], i, j, block, scale) - lse[i][..., None])
        dp = jnp.einsum("bkglh,bksh->bkgls", dob[i], vb[j])
        return p, p * (dp - delta[i][..., None])

    def dq_block(_, i):  # dq_i = sum over j <= i of dS_ij k_j
        def body(j, acc):
            _, ds = probs_and_ds(i, j)
            return acc + jnp.einsum("bkgls,bksh->bkglh", ds, kb[j])
        return None, jax.lax.fori_loop(0, i + 1, body, jnp.zeros_like(qb[i])) * scale

    def dkv_block(_, j):  # dk_j, dv_j = sums over i >= j, and over the G query heads
        def body(i, acc):
            dk, dv = acc
            p, ds = probs_and_ds(i, j)
            return (dk + jnp.einsum("bkgls,bkglh->bksh", ds, qb[i]),
                    dv + jnp.einsum("bkgls,bkglh->bksh", p, dob[i]))
        zeros = jnp.zeros_like(kb[j])
        dk, dv = jax.lax.fori_loop(j, nb, body, (zeros, zeros))
        return None, (dk * scale, dv)

    _, dq = jax.lax.scan(dq_block, None, jnp.arange(nb))
    _, (dk, dv) = jax.lax.scan(dkv_block, None, jnp.arange(nb))
    dq = rearrange(dq, "i b k g l h -> b (i l) (k g) h")[:, :t].astype(q.dtype)
    dk = rearrange(dk, "j b k l h -> b (j l) k h")[:, :t].astype(k.dtype)
    dv = rearrange(dv, "j b k l h -> b (j l) k h")[:, :t].astype(v.dtype)
    return dq, dk, dv


flash_attention.defvjp(_fwd, _bwd)
