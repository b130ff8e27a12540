"""Block-causal attention for training: the model's causal attention, cheaper on CPU.

`spark_model.modules.causal_attention` forms the full (T, S) score matrix and masks its
upper triangle. Here the queries are cut into blocks of `block` rows and each block only
meets the keys it can see (keys [0, end of block)), so about half of the score matrix, its
softmax and their gradients are never computed; the kv-head grouping is folded into the
rows of one 4-D matmul per block. The result is the same function (masked entries carry
exactly zero probability either way); only float rounding differs (~1e-6, see
tests/test_train.py). On the tiny preset (batch 8, seq_len 512, 2 CPU cores) the whole
train step takes about 1/6 less time than with `causal_attention` (best of 12 steps:
1.37-1.38 s against 1.62-1.65 s, in two runs).

It plugs into the model through its attention-kernel argument:
``model.hidden(tokens, positions, [block_causal_attention] * n_layers)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 64


@functools.lru_cache(maxsize=256)
def _bias(q_start: int, q_end: int, s_end: int, groups: int) -> np.ndarray:
    """Additive mask for rows (group, query position) x keys [0, s_end): 0 or -inf."""
    q_pos = np.tile(np.arange(q_start, q_end), groups)
    bias = np.where(np.arange(s_end)[None, :] <= q_pos[:, None], 0.0, -np.inf)
    out = bias.astype(np.float32)
    out.flags.writeable = False
    return out


def block_causal_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                           block: int = DEFAULT_BLOCK) -> tuple[jax.Array, None]:
    """Causal grouped-query attention (query i, at position i + S - T, sees keys <= it).

    Shapes as in spark_model.modules: q (B, T, N, H), k and v (B, S, K, H) -> (B, T, N, H).
    """
    b, t, n, h = q_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    offset = s - t
    scale = 1.0 / math.sqrt(h)
    q_bkgth = q_btnh.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)
    k_bksh = k_bskh.transpose(0, 2, 1, 3)
    v_bksh = v_bskh.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)
        rows = end - start
        s_end = end + offset  # keys visible to the block's last query
        q_bkrh = q_bkgth[:, :, :, start:end].reshape(b, kv, g * rows, h)
        scores = jnp.einsum("bkrh,bksh->bkrs", q_bkrh, k_bksh[:, :, :s_end],
                            preferred_element_type=jnp.float32) * scale
        scores = scores + _bias(start + offset, end + offset, s_end, g)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
        o = jnp.einsum("bkrs,bksh->bkrh", probs, v_bksh[:, :, :s_end])
        outs.append(o.reshape(b, kv, g, rows, h))
    o_bkgth = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return o_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), None
