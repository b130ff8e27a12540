"""The model's forward pass for training, written with 2-D matmuls for CPU speed.

`Transformer.__call__` computes its projections as 3-D einsums ("btd,df->btf"); XLA:CPU
lowers their backward passes (contractions over both batch and time) about 3x slower than
the same products on (B*T, D) matrices. This module computes the very same function from
the very same parameters -- the model's own RMSNorm modules, `apply_rope`,
`rope_frequencies`, `embed_tokens` and `logits` -- but flattens batch and time for every
projection and fuses q|k|v and gate|up into one matmul each. On the tiny preset it makes
the train step about twice as fast on CPU; `tests/test_train.py` checks that it agrees with
`Transformer.__call__` (values and gradients), so a change to the model that this file does
not follow fails the tests instead of silently training a different function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spark_model.layers import apply_rope, rope_frequencies
from spark_model.modules import AttendFn, Block
from spark_model.transformer import Transformer


def _block(block: Block, x_btd: jax.Array, positions_bt: jax.Array, attend: AttendFn,
           dtype) -> jax.Array:
    b, t, d = x_btd.shape
    attn, mlp = block.attn, block.mlp
    n, h = attn.q.shape[1], attn.q.shape[2]
    kv = attn.k.shape[1]
    w_qkv = jnp.concatenate([attn.q[...].reshape(d, n * h), attn.k[...].reshape(d, kv * h),
                             attn.v[...].reshape(d, kv * h)], axis=1).astype(dtype)
    qkv = block.attn_norm(x_btd).reshape(b * t, d) @ w_qkv
    q = qkv[:, :n * h].reshape(b, t, n, h)
    k = qkv[:, n * h:(n + kv) * h].reshape(b, t, kv, h)
    v = qkv[:, (n + kv) * h:].reshape(b, t, kv, h)
    freqs = rope_frequencies(*attn.rope)
    q, k = apply_rope(q, positions_bt, freqs), apply_rope(k, positions_bt, freqs)
    o, _ = attend(q, k, v)
    w_o = attn.o[...].reshape(n * h, d).astype(dtype)
    x_btd = x_btd + (o.reshape(b * t, n * h) @ w_o).reshape(b, t, d)
    f = mlp.gate.shape[1]
    w_gu = jnp.concatenate([mlp.gate[...], mlp.up[...]], axis=1).astype(dtype)
    gu = block.mlp_norm(x_btd).reshape(b * t, d) @ w_gu
    act = jax.nn.silu(gu[:, :f]) * gu[:, f:]
    return x_btd + (act @ mlp.down[...].astype(dtype)).reshape(b, t, d)


def hidden(model: Transformer, tokens_bt: jax.Array, positions_bt: jax.Array,
           attend: AttendFn) -> jax.Array:
    """The residual stream after the last block, (B, T, D): `model.hidden(...)[0]`."""
    dtype = jnp.dtype(model.cfg.dtype)
    x = model.embed_tokens(tokens_bt)
    for block in model.blocks:
        x = _block(block, x, positions_bt, attend, dtype)
    return x


def logits(model: Transformer, tokens_bt: jax.Array, attend: AttendFn) -> jax.Array:
    """Full causal forward over whole sequences: the same as `model(tokens_bt)` (f32)."""
    positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    return model.logits(hidden(model, tokens_bt, positions, attend))


def _rows_per_chunk(n: int, target: int) -> int:
    """The largest divisor of n that is at most target (n itself when n <= target)."""
    if n <= target:
        return n
    for r in range(target, 0, -1):
        if n % r == 0:
            return r
    return n


def token_nll(model: Transformer, inputs_bt: jax.Array, targets_bt: jax.Array,
              attend: AttendFn, chunk_rows: int = 256) -> jax.Array:
    """Per-token cross-entropy in nats, (B, T) f32, of the model's next-token logits.

    The output projection and softmax run over `chunk_rows` tokens at a time under
    `jax.checkpoint`: the (B*T, V) f32 logits are never held whole (the backward pass
    recomputes each chunk's), which keeps them in cache and is ~20% faster on CPU.
    """
    b, t = inputs_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t), inputs_bt.shape)
    x_btd = hidden(model, inputs_bt, positions, attend)
    d = x_btd.shape[-1]
    rows = _rows_per_chunk(b * t, chunk_rows)

    @jax.checkpoint
    def chunk(x_rd, y_r):
        logits_rv = model.logits(x_rd[None])[0]  # final norm + output projection, f32
        logz = jax.nn.logsumexp(logits_rv, axis=-1)
        picked = jnp.take_along_axis(logits_rv, y_r[:, None], axis=-1)[:, 0]
        return logz - picked

    xs = x_btd.reshape(b * t // rows, rows, d)
    ys = targets_bt.reshape(b * t // rows, rows)
    _, nll = jax.lax.scan(lambda carry, xy: (carry, chunk(*xy)), None, (xs, ys))
    return nll.reshape(b, t)
