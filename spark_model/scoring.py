"""Scoring long sequences in memory proportional to their length.

The full forward (`Transformer.__call__`) forms each layer's (T, T) attention scores and
the (T, V) logits at once: at T = 16,384 that is tens of GB, at 131,072 terabytes. Here
the same model scores a sequence with

- blockwise causal attention (`flash_attention`): queries in blocks of `block` rows meet
  keys block by block up to the diagonal with a running (online) softmax, so only one
  (block x block) score tile per kv head exists at a time and tiles above the diagonal
  are never computed;
- chunked logits: the final norm, output projection and log-softmax run over `chunk`
  positions at a time, and only each position's negative log-likelihood is kept.

Same function as the full forward (to float rounding; tests/test_scoring.py compares
them). Memory is O(T * width) for the residual stream and the projections of one layer,
plus O(block^2) and O(chunk * V) for tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from spark_model.flash_attention import DEFAULT_BLOCK, flash_attention
from spark_model.transformer import Transformer

DEFAULT_CHUNK = 2048


@functools.partial(nnx.jit, static_argnames=("block", "chunk"))
def token_nll(model: Transformer, tokens_bt: jax.Array, targets_bt: jax.Array, *,
              block: int = DEFAULT_BLOCK, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """-log p(targets[b, t] | tokens[b, :t+1]) in nats, (B, T) float32, memory O(T)."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def attend(q, k, v):
        return flash_attention(q, k, v, block), None

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
