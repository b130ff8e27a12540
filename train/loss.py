"""The training loss: per-token cross-entropy of the model's own forward pass.

The blocks run through `Transformer.hidden` with `spark_model.flash_attention` (the same
function as the model's causal attention, computed tile by tile with its own backward, so
memory grows linearly with the sequence); the final norm and output projection are the
model's `logits`. Tiles of 128 rows: on `tiny` (2 CPU cores) a forward and backward over
8 x 512 tokens took about as long as the earlier per-block kernel (paired ratio 0.99), and
over 1 x 4,096 about 0.62 of its time, which also kept every (T, T) score matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spark_model.flash_attention import flash_attention
from spark_model.modules import AttendFn
from spark_model.transformer import Transformer

TRAIN_BLOCK = 128  # attention tile rows for training (see the module docstring)


def flash_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, None]:
    """The training attention kernel, in `Transformer.hidden`'s AttendFn form."""
    return flash_attention(q, k, v, TRAIN_BLOCK), None


def _rows_per_chunk(n: int, target: int) -> int:
    """The largest divisor of n that is at most target (n itself when n <= target)."""
    if n <= target:
        return n
    for r in range(target, 0, -1):
        if n % r == 0:
            return r
    return n


def token_nll(model: Transformer, inputs_bt: jax.Array, targets_bt: jax.Array,
              attend: AttendFn = flash_attend, chunk_rows: int = 256,
              positions_bt: jax.Array | None = None) -> jax.Array:
    """Per-token negative log-likelihood in nats, (B, T) f32, of the model's next-token
    logits (the same values as `model(inputs_bt, positions_bt)` gives).

    `positions_bt`: the tokens' rotary position ids (default 0 .. T-1 in every row; PoSE
    training passes its own, train/pose.py). Attention stays causal by index, so ids must
    increase along each row.

    The output projection and softmax run over `chunk_rows` tokens at a time under
    `jax.checkpoint`: the (B*T, V) f32 logits are never held whole (the backward pass
    recomputes each chunk's). That bounds memory, not time: on the tiny preset (batch 8,
    seq_len 512, 2 CPU cores) whole logits made the step about 5% faster.
    """
    b, t = inputs_bt.shape
    positions = (jnp.broadcast_to(jnp.arange(t), inputs_bt.shape) if positions_bt is None
                 else positions_bt)
    x_btd, _ = model.hidden(inputs_bt, positions, [attend] * model.cfg.n_layers)
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
