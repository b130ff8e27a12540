"""Scoring long sequences in memory proportional to their length.

The full forward (`Transformer.__call__`) forms each layer's (T, T) attention scores and
the (T, V) logits at once: at T = 16,384 that is tens of GB, at 131,072 terabytes. Here
the same model scores a sequence with

- blockwise causal attention: queries in blocks of `block` rows meet keys block by block
  up to the diagonal with a running (online) softmax, so only one (block x block) score
  tile per kv head exists at a time and blocks above the diagonal are never computed;
- chunked logits: the final norm, output projection and log-softmax run over `chunk`
  positions at a time, and only each position's negative log-likelihood is kept.

Same function as the full forward (to float rounding; tests/test_scoring.py compares
them), no gradient: it is for evaluation. Memory is O(T * width) for the residual
stream and the projections of one layer, plus O(block^2) and O(chunk * V) for tiles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from spark_model.transformer import Transformer

DEFAULT_BLOCK = 512
DEFAULT_CHUNK = 2048


def blockwise_causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                               block: int = DEFAULT_BLOCK) -> tuple[jax.Array, None]:
    """Causal grouped-query self-attention (query i sees keys <= i) block by block.

    q (B, T, N, H), k and v (B, T, K, H) -> (B, T, N, H). T is padded to a multiple of
    `block` internally; padded keys sit after every real query, so they are never seen.
    """
    b, t, n, h = q_btnh.shape
    kv = k_btkh.shape[2]
    g = n // kv
    nb = -(-t // block)
    pad = nb * block - t
    if pad:
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                  for x in (q_btnh, k_btkh, v_btkh))
    scale = 1.0 / math.sqrt(h)
    # Blocks first, so a block is one dynamic index: q (nb, B, K, G, L, H), k/v (nb, B, K, L, H).
    q = rearrange(q_btnh, "b (i l) (k g) h -> i b k g l h", l=block, k=kv)
    k = rearrange(k_btkh, "b (j l) k h -> j b k l h", l=block)
    v = rearrange(v_btkh, "b (j l) k h -> j b k l h", l=block)
    diag = jnp.arange(block)[:, None] >= jnp.arange(block)[None, :]  # (L query, L key)

    def query_block(_, i):
        qi = q[i].astype(jnp.float32) * scale

        def key_block(j, carry):
            m, l_sum, acc = carry
            s = jnp.einsum("bkglh,bksh->bkgls", qi, k[j].astype(jnp.float32))
            s = jnp.where((j < i) | diag, s, -jnp.inf)  # only the diagonal tile is masked
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l_sum = l_sum * correction + p.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgls,bksh->bkglh", p, v[j].astype(jnp.float32))
            return m_new, l_sum, acc

        init = (jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
                jnp.zeros(qi.shape[:-1], jnp.float32), jnp.zeros(qi.shape, jnp.float32))
        _, l_sum, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        return None, (acc / l_sum[..., None]).astype(q_btnh.dtype)

    _, o = jax.lax.scan(query_block, None, jnp.arange(nb))  # (nb, B, K, G, L, H)
    o = rearrange(o, "i b k g l h -> b (i l) (k g) h")
    return o[:, :t], None


@functools.partial(nnx.jit, static_argnames=("block", "chunk"))
def token_nll(model: Transformer, tokens_bt: jax.Array, targets_bt: jax.Array, *,
              block: int = DEFAULT_BLOCK, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """-log p(targets[b, t] | tokens[b, :t+1]) in nats, (B, T) float32, memory O(T)."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    attend = functools.partial(blockwise_causal_attention, block=block)
    x, _ = model.hidden(tokens_bt, positions, [attend] * model.cfg.n_layers)
    nc = -(-t // chunk)
    pad = nc * chunk - t
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    x_c = rearrange(x, "b (c l) d -> c b l d", l=chunk)
    y_c = rearrange(y, "b (c l) -> c b l", l=chunk)

    def nll(args):
        xc, yc = args
        logits = model.logits(xc)  # (B, chunk, V) f32
        picked = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    out = jax.lax.map(nll, (x_c, y_c))  # (nc, B, chunk)
    return rearrange(out, "c b l -> b (c l)")[:, :t]
