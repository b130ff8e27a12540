"""The KV cache and the attention kernel that reads it.

Layout: one (B, S, K, H) array for keys and one for values per layer. S is the capacity
rounded up to a whole number of BIG_BLOCKs, so every block the kernel reads is in bounds.

`cached_attention` pays for the filled part only: it walks the cache in blocks with an
online softmax and a trip count computed from the positions actually queried, so a step at
position p reads about p keys whatever the capacity. Big blocks cover the bulk (few loop
iterations at 100K), small blocks the tail (little waste at short positions).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import struct

from spark_model.config import ModelConfig

BIG_BLOCK = 2048  # keys per iteration over the bulk of the cache
SMALL_BLOCK = 128  # keys per iteration over the tail
_NEG = -1e30  # finite "minus infinity": keeps the online-softmax rescaling NaN-free


@struct.dataclass
class KVCache:
    """Keys and values of every layer: tuples of (B, S, K, H) arrays."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        """S: allocated positions (>= the requested capacity)."""
        return self.k[0].shape[1]


def cache_length(capacity: int) -> int:
    """Allocated positions for a capacity: whole BIG_BLOCKs, so block reads stay in bounds."""
    return max(BIG_BLOCK, math.ceil(capacity / BIG_BLOCK) * BIG_BLOCK)


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
    shape = (batch, cache_length(capacity), cfg.n_kv_heads, cfg.head_dim)  # (B, S, K, H)
    dt = jnp.dtype(cfg.dtype)
    return KVCache(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
                   v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)))


def write(cache_bskh: jax.Array, new_btkh: jax.Array, start_b: jax.Array) -> jax.Array:
    """Write T new rows for each sequence b at positions start_b[b] .. start_b[b] + T - 1."""
    def one(c_skh, n_tkh, s):
        return jax.lax.dynamic_update_slice_in_dim(c_skh, n_tkh.astype(c_skh.dtype), s, axis=0)
    return jax.vmap(one)(cache_bskh, new_btkh, start_b)


def _blocks(q_btkgh, k_bskh, v_bskh, q_pos_bt, carry, start, n_blocks, block):
    """Online softmax over n_blocks blocks of `block` keys from `start`; carry (m, l, acc)."""

    def body(j, carry):
        m_bkgt, l_bkgt, acc_bkgth = carry
        s0 = start + j * block
        k_blk = jax.lax.dynamic_slice_in_dim(k_bskh, s0, block, axis=1)  # (B, blk, K, H)
        v_blk = jax.lax.dynamic_slice_in_dim(v_bskh, s0, block, axis=1)
        s = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_blk,
                       preferred_element_type=jnp.float32)
        key_pos = s0 + jnp.arange(block)
        mask_bts = key_pos[None, None, :] <= q_pos_bt[:, :, None]  # causal, and filled only
        mask = mask_bts[:, None, None, :, :]
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m_bkgt, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_bkgt - m_new)
        l_new = alpha * l_bkgt + p.sum(axis=-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v_blk.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return m_new, l_new, alpha[..., None] * acc_bkgth + pv

    return jax.lax.fori_loop(0, n_blocks, body, carry)


def cached_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                     q_pos_bt: jax.Array) -> jax.Array:
    """Attention of queries at positions q_pos over cache entries at positions <= q_pos.

    Cost follows max(q_pos), not the cache length S: the loops stop after the block that
    holds the furthest query position.
    """
    b, t, n, h = q_btnh.shape
    k_heads = k_bskh.shape[2]
    q = rearrange(q_btnh, "b t (k g) h -> b t k g h", k=k_heads) * (1.0 / math.sqrt(h))
    g = n // k_heads
    carry = (jnp.full((b, k_heads, g, t), _NEG, jnp.float32),
             jnp.zeros((b, k_heads, g, t), jnp.float32),
             jnp.zeros((b, k_heads, g, t, h), jnp.float32))
    n_keys = jnp.max(q_pos_bt) + 1  # keys 0 .. max position inclusive
    n_big = n_keys // BIG_BLOCK
    carry = _blocks(q, k_bskh, v_bskh, q_pos_bt, carry, 0, n_big, BIG_BLOCK)
    tail_start = n_big * BIG_BLOCK
    n_small = (n_keys - tail_start + SMALL_BLOCK - 1) // SMALL_BLOCK
    m, l, acc = _blocks(q, k_bskh, v_bskh, q_pos_bt, carry, tail_start, n_small, SMALL_BLOCK)
    o = acc / l[..., None]  # (B, K, G, T, H)
    return rearrange(o, "b k g t h -> b t (k g) h").astype(q_btnh.dtype)
