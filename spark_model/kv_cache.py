"""The KV cache and the attention kernel that reads it.

Layout: one (B, K, S, H) array for keys and one for values per layer, so each kv head's
positions are contiguous and a new token is one contiguous row per head. S is the capacity
rounded up to a whole number of BIG_BLOCKs, so every block the kernel reads is in bounds.

Layout matters on XLA:CPU. A q.k dot wants keys as (H, S); given (S, H) it transposes the
whole cache inside every decode step, and storing keys as (H, S) instead makes each new
token a strided column write, for which XLA copies the cache. So a single-query step
(T = 1, decoding) forms q.k as a multiply-and-reduce over H, which reads (S, H) rows as
they lie; prefill chunks (T > 1) use the dot, whose transpose is paid once per chunk.

`cached_attention` pays for the filled part only. In XLA ops (`blocked_attention`) it walks
the cache in blocks with an online softmax and a trip count computed from the positions
actually queried, so a step at position p reads about p keys whatever the capacity. Big
blocks cover the bulk (few loop iterations at 100K), small blocks the tail (little waste at
short positions). On CPU a decode step instead calls a native kernel (`spark_model.kernels`):
XLA:CPU copies every dynamically sliced block before using it, which held those loops to
about 6 GB/s.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import struct

from spark_model import kernels
from spark_model.config import ModelConfig

BIG_BLOCK = 2048  # keys per iteration over the bulk of the cache
SMALL_BLOCK = 128  # keys per iteration over the tail
_NEG = -1e30  # finite "minus infinity": keeps the online-softmax rescaling NaN-free


@struct.dataclass
class KVCache:
    """Keys and values of every layer: tuples of (B, K, S, H) arrays."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        """S: allocated positions (>= the requested capacity)."""
        return self.k[0].shape[2]


def cache_length(capacity: int) -> int:
    """Allocated positions: whole BIG_BLOCKs, so block reads stay in bounds, plus one
    SMALL_BLOCK. The extra block is not needed for correctness: a cache exactly one
    BIG_BLOCK long made the block slice span the whole array, and XLA:CPU then compiled
    the step into one that ran at half speed."""
    return math.ceil(capacity / BIG_BLOCK) * BIG_BLOCK + SMALL_BLOCK


def init_cache(cfg: ModelConfig, batch: int, capacity: int, device=None) -> KVCache:
    """A zeroed cache, committed to `device` (default: the first). Committed like the
    engine's outputs, so a fresh cache and a returned one hit the same compiled program
    (an uncommitted array is a different jit signature and compiles everything again)."""
    shape = (batch, cfg.n_kv_heads, cache_length(capacity), cfg.head_dim)  # (B, K, S, H)
    dt = jnp.dtype(cfg.dtype)
    device = device or jax.devices()[0]
    return KVCache(k=tuple(jnp.zeros(shape, dt, device=device) for _ in range(cfg.n_layers)),
                   v=tuple(jnp.zeros(shape, dt, device=device) for _ in range(cfg.n_layers)))


def write(cache_bksh: jax.Array, new_btkh: jax.Array, start_b: jax.Array) -> jax.Array:
    """Write T new rows for each sequence b at positions start_b[b] .. start_b[b] + T - 1.

    One dynamic-update-slice per sequence, unrolled over the (static) batch: each is done
    in place. A vmapped update lowers to a scatter, which XLA:CPU ran as a loop over the
    whole cache (every step of a 16-row batch rewrote 277 MB).

    The cache may hold more rows than there are new sequences: sequence b goes to row b,
    and the rows past the batch are left alone (the serving engine steps only its first
    few slots when few are busy).
    """
    new_bkth = rearrange(new_btkh, "b t k h -> b k t h").astype(cache_bksh.dtype)
    zero = jnp.zeros((), start_b.dtype)
    for b in range(new_bkth.shape[0]):
        cache_bksh = jax.lax.dynamic_update_slice(
            cache_bksh, new_bkth[b:b + 1], (b + zero, zero, start_b[b], zero))
    return cache_bksh


def _scores(q_bkgth: jax.Array, k_bksh: jax.Array) -> jax.Array:
    """q.k for one block, (B, K, G, T, S), in f32 (see the module docstring for the T=1 form)."""
    if q_bkgth.shape[3] == 1:
        prod = q_bkgth[:, :, :, :, None, :] * k_bksh[:, :, None, None, :, :]
        return jnp.sum(prod.astype(jnp.float32), axis=-1)
    return jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32)


def _update(carry, q_bkgth, k_blk, v_blk, key_pos, q_pos_bt):
    """Fold one block of keys into the online softmax state (m, l, acc)."""
    m_bkgt, l_bkgt, acc_bkgth = carry
    mask = (key_pos[None, None, :] <= q_pos_bt[:, :, None])[:, None, None]  # (B,1,1,T,S)
    s = jnp.where(mask, _scores(q_bkgth, k_blk), _NEG)
    m_new = jnp.maximum(m_bkgt, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m_bkgt - m_new)
    pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return m_new, alpha * l_bkgt + p.sum(axis=-1), alpha[..., None] * acc_bkgth + pv


def _blocks(q_bkgth, k_bksh, v_bksh, q_pos_bt, carry, start, n_blocks, block):
    """Online softmax over n_blocks blocks of `block` keys from `start` (in the cache's
    first B rows, B being the number of query sequences)."""
    b, k_heads, h = q_bkgth.shape[0], k_bksh.shape[1], k_bksh.shape[3]

    def body(j, carry):
        s0 = start + j * block
        zero = jnp.zeros_like(s0)
        at, size = (zero, zero, s0, zero), (b, k_heads, block, h)
        k_blk = jax.lax.dynamic_slice(k_bksh, at, size)  # (B, K, blk, H)
        v_blk = jax.lax.dynamic_slice(v_bksh, at, size)
        return _update(carry, q_bkgth, k_blk, v_blk, s0 + jnp.arange(block), q_pos_bt)

    return jax.lax.fori_loop(0, n_blocks, body, carry)


def cached_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array,
                     q_pos_bt: jax.Array) -> jax.Array:
    """Attention of queries at positions q_pos over cache entries at positions <= q_pos.

    Query sequence b reads cache row b; a cache with more rows than queries is read only
    in its first rows. A decode step (T = 1) on CPU runs the native kernel when it is
    available (see `spark_model.kernels`), and so do many queries per sequence (a prefill
    chunk, `kernels.prefill_attention`); everything else runs `blocked_attention`.
    """
    b, t, n, h = q_btnh.shape
    k_heads = k_bksh.shape[1]
    if t == 1 and kernels.usable(q_btnh, k_bksh):
        # Reads each row's keys up to its own position, in place, on all intra-op threads.
        q_bkgh = rearrange(q_btnh[:, 0], "b (k g) h -> b k g h", k=k_heads) * (1.0 / math.sqrt(h))
        o = kernels.decode_attention(q_bkgh, k_bksh, v_bksh, q_pos_bt[:, 0])
        return rearrange(o, "b k g h -> b 1 (k g) h").astype(q_btnh.dtype)
    if kernels.row_exact_active() and kernels.usable(q_btnh, k_bksh):
        # Each (sequence, position) query as its own decode-kernel query over its row.
        q_qkgh = rearrange(q_btnh, "b t (k g) h -> (b t) k g h", k=k_heads) * (1.0 / math.sqrt(h))
        row_q = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)
        o = kernels.decode_attention_rows(q_qkgh, k_bksh, v_bksh, q_pos_bt.reshape(-1), row_q)
        return rearrange(o, "(b t) k g h -> b t (k g) h", b=b).astype(q_btnh.dtype)
    if kernels.usable(q_btnh, k_bksh) and kernels.prefill_attention_fits(q_btnh, k_bksh):
        # A prefill chunk: score blocks in registers, keys past every query skipped.
        q_bkgth = rearrange(q_btnh, "b t (k g) h -> b k g t h", k=k_heads) * (1.0 / math.sqrt(h))
        o = kernels.prefill_attention(q_bkgth, k_bksh, v_bksh, q_pos_bt)
        return rearrange(o, "b k g t h -> b t (k g) h").astype(q_btnh.dtype)
    return blocked_attention(q_btnh, k_bksh, v_bksh, q_pos_bt)


def blocked_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array,
                      q_pos_bt: jax.Array) -> jax.Array:
    """`cached_attention` in XLA ops: an online softmax over blocks of the cache.

    Cost follows max(q_pos), not the cache length S: the loops stop after the block that
    holds the furthest query position.
    """
    b, t, n, h = q_btnh.shape
    k_heads = k_bksh.shape[1]
    q = rearrange(q_btnh, "b t (k g) h -> b k g t h", k=k_heads) * (1.0 / math.sqrt(h))
    g = n // k_heads
    carry = (jnp.full((b, k_heads, g, t), _NEG, jnp.float32),
             jnp.zeros((b, k_heads, g, t), jnp.float32),
             jnp.zeros((b, k_heads, g, t, h), jnp.float32))
    n_keys = jnp.max(q_pos_bt) + 1  # keys 0 .. max position inclusive
    n_big = n_keys // BIG_BLOCK
    carry = _blocks(q, k_bksh, v_bksh, q_pos_bt, carry, 0, n_big, BIG_BLOCK)
    tail_start = n_big * BIG_BLOCK
    n_small = (n_keys - tail_start + SMALL_BLOCK - 1) // SMALL_BLOCK
    m, l, acc = _blocks(q, k_bksh, v_bksh, q_pos_bt, carry, tail_start, n_small, SMALL_BLOCK)
    o = acc / l[..., None]  # (B, K, G, T, H)
    return rearrange(o, "b k g t h -> b t (k g) h").astype(q_btnh.dtype)


# The name under which `attend` appears in a traced program (a `jit` equation): the
# compiler finds the attention over the cache by it, and treats everything inside as one op.
ATTENTION_OP = "kv_cache_attention"


def attend(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, k_bksh: jax.Array,
           v_bksh: jax.Array, q_pos_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Append the new keys and values at the queries' positions, then attend over the cache.

    Returns (o_btnh, k_bksh, v_bksh). Compiled as a nested jit named ATTENTION_OP so the
    whole cache step is one visible unit in a trace; XLA inlines it into the caller.
    """
    # The row-exact mode changes what is traced, so it is part of the nested jit's key.
    return _attend_jit(q_btnh, k_btkh, v_btkh, k_bksh, v_bksh, q_pos_bt,
                       row_exact=kernels.row_exact_active())


def _attend(q_btnh, k_btkh, v_btkh, k_bksh, v_bksh, q_pos_bt, row_exact=False):
    start_b = q_pos_bt[:, 0]
    k_bksh = write(k_bksh, k_btkh, start_b)
    v_bksh = write(v_bksh, v_btkh, start_b)
    if row_exact:
        with kernels.row_exact():
            return cached_attention(q_btnh, k_bksh, v_bksh, q_pos_bt), k_bksh, v_bksh
    return cached_attention(q_btnh, k_bksh, v_bksh, q_pos_bt), k_bksh, v_bksh


_attend.__name__ = ATTENTION_OP
_attend_jit = jax.jit(_attend, static_argnames=("row_exact",))

