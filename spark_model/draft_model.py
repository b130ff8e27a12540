"""Draft-model speculative decoding: a small model with the same vocabulary proposes k
tokens, the model verifies them in one call, inside the one compiled token loop.

Each iteration the draft model, with a KV cache of its own, first runs the sequence's two
latest tokens (the one before `last` again, since after a fully accepted round the draft
never saw the last draft token, and `last`), then k - 1 more single steps, taking its
argmax each time: k drafts d_1..d_k. The model runs `last` and the drafts at consecutive
positions in one call traced inside `kernels.row_exact()`, and `speculative.accept` keeps
them by argmax (greedy: bitwise plain decoding) or by the speculative-sampling rule (a
greedy draft is a point mass, so the rule of `spark_model.speculative` applies as is).
Positions the draft model wrote for rejected drafts lie past the sequence's new position
and are written again before any of its queries can reach them, as in the model's cache.

The draft costs k small steps per iteration, so it pays when the draft model is much
cheaper than the model and agrees with it often; `last_stats` reports the counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from spark_model import kernels
from spark_model.engine import Constants, DecodeState, merge, prefill
from spark_model.kv_cache import KVCache
from spark_model.sampling import argmax
from spark_model.speculative import accept, emit_tokens
from spark_model.transformer import Transformer


@struct.dataclass
class DraftState:
    """What the draft model adds to the loop's carry."""

    cache: KVCache  # the draft model's own cache
    prev_b: jax.Array  # (B,) the token before last_b (at position_b - 1)
    drafted_b: jax.Array  # (B,) draft tokens proposed
    accepted_b: jax.Array  # (B,) draft tokens emitted


def propose(draft: Transformer, s: DecodeState, cache: KVCache, prev_b: jax.Array, k: int
            ) -> tuple[jax.Array, KVCache]:
    """k greedy drafts per sequence (B, k) and the draft model's updated cache (prev_b: the
    token before each sequence's last one)."""
    toks = jnp.stack([prev_b, s.last_b], axis=1)
    x_btd, cache = draft.cached(toks, s.position_b[:, None] + jnp.arange(-1, 1), cache)
    d_b = argmax(draft.logits(x_btd[:, 1:])[:, 0]).astype(jnp.int32)
    drafts = [d_b]
    for j in range(1, k):
        x_btd, cache = draft.cached(d_b[:, None], (s.position_b + j)[:, None], cache)
        d_b = argmax(draft.logits(x_btd)[:, 0]).astype(jnp.int32)
        drafts.append(d_b)
    return jnp.stack(drafts, axis=1), cache


def decode(model: Transformer, draft: Transformer, state: DecodeState, ds: DraftState,
           c: Constants, limit: jax.Array, k: int) -> tuple[DecodeState, DraftState]:
    """Decode with k drafts per iteration until every sequence is done or `limit`
    iterations (each 1 .. k + 1 tokens per sequence) have run."""
    batch = state.last_b.shape[0]
    rows = jnp.arange(batch)

    def cond(carry):
        s, _ = carry
        return (s.step < limit) & ~jnp.all(s.done_b)

    def body(carry):
        s, ds = carry
        want_b = ~s.done_b
        draft_bk, dcache = propose(draft, s, ds.cache, ds.prev_b, k)
        toks = jnp.concatenate([s.last_b[:, None], draft_bk], axis=1)  # (B, k + 1)
        with kernels.row_exact():
            x_btd, cache = model.cached(toks, s.position_b[:, None] + jnp.arange(k + 1),
                                        s.cache)
            logits = model.logits(x_btd)
        y_bt, m_b = accept(logits, draft_bk, want_b, c.sampling, s.step)
        count0, step0, last0 = s.count_b, s.step, s.last_b
        s, _ = emit_tokens(s.replace(cache=cache), y_bt, m_b + 1, c)
        emitted = s.count_b - count0
        # The token now before last: the last accepted draft, or the old last if none.
        prev = jnp.where(m_b > 0, y_bt[rows, jnp.maximum(m_b - 1, 0)], last0)
        ds = ds.replace(cache=dcache, prev_b=jnp.where(emitted > 0, prev, ds.prev_b),
                        drafted_b=ds.drafted_b + jnp.where(want_b, k, 0),
                        accepted_b=ds.accepted_b + jnp.minimum(m_b, emitted))
        return s.replace(step=step0 + 1), ds

    return jax.lax.while_loop(cond, body, (state, ds))


@functools.partial(jax.jit, static_argnums=(0, 2, 9, 10), donate_argnums=(4, 5))
def generate_jit(graphdef, params, draft_graphdef, draft_params, cache, draft_cache,
                 prompt_bp, prompt_len_b, c: Constants, n_out: int, k: int
                 ) -> tuple[DecodeState, DraftState]:
    """`engine.generate_jit` with k drafts per iteration from the draft model."""
    model = merge(graphdef, params)
    draft = merge(draft_graphdef, draft_params)
    state = prefill(model, cache, prompt_bp, prompt_len_b, c, n_out)
    dstate = prefill(draft, draft_cache, prompt_bp, prompt_len_b, c, n_out)
    batch = prompt_bp.shape[0]
    prev = jnp.take_along_axis(prompt_bp, (prompt_len_b - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros((batch,), jnp.int32)
    ds = DraftState(cache=dstate.cache, prev_b=prev, drafted_b=zeros, accepted_b=zeros)
    return decode(model, draft, state, ds, c, c.max_new, k)
