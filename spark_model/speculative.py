"""Prompt-lookup speculative decoding, greedy, inside the one compiled token loop.

Code that is being rewritten repeats what the context already holds. Each iteration, every
sequence looks for the latest earlier occurrence of its last few tokens (3, else 2) in its
prompt and output so far and proposes the k tokens that followed it; one call of the model
over k + 1 tokens per sequence (the latest token and the k drafts, at consecutive
positions) verifies them all, and the sequence takes the longest prefix of drafts the model
agrees with plus the model's own next token: 1 to k + 1 tokens for about the cost of two
single steps on a memory-bound CPU.

Exactness: the verify call is traced inside `kernels.row_exact()`, where each of its
(sequence, position) rows is computed by the same native kernels as a one-token decode
step (products in row groups whose per-row result does not depend on the group, attention
by the decode kernel one query at a time), and the greedy choice is the same argmax; so the
output is bitwise the plain decoder's. Accepted tokens pass through the engine's `_emit`
one at a time, so end ids, stop strings and max_new_tokens end a sequence at exactly the
token they would have, and nothing after it is emitted. Keys the verify call wrote for
rejected drafts sit past the sequence's position and are overwritten before any query can
see them (a query attends only to positions <= its own).

Drafting stops paying when drafts keep failing (fresh code): a sequence whose drafts are
rejected outright twice in a row stops drafting for a back-off of 8 iterations, doubling
up to 128 while it keeps failing; an iteration in which no sequence drafts runs the plain
one-token step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from spark_model import kernels
from spark_model.engine import Constants, DecodeState, _emit, merge, prefill
from spark_model.sampling import argmax, sample
from spark_model.transformer import Transformer

MAX_DRAFT = 8  # draft_tokens is 1 .. MAX_DRAFT
NGRAMS = (3, 2)  # n-gram lengths looked up, longest first
MISSES = 2  # outright rejections in a row that pause a sequence's drafting
BACKOFF_MIN, BACKOFF_MAX = 8, 128  # iterations a pause lasts (doubling while drafts fail)


class SpeculationError(ValueError):
    """A speculative-decoding request that cannot be served (bad draft_tokens, sampling)."""


def check_draft_tokens(k) -> int:
    """k as an int in 1..MAX_DRAFT, else SpeculationError."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT:
        raise SpeculationError(f"draft_tokens must be an integer in 1..{MAX_DRAFT}, got {k!r}")
    return k


@struct.dataclass
class SpecState:
    """What speculation adds to the loop's carry."""

    hist_bl: jax.Array  # (B, L) each sequence's prompt, then its generated ids
    hist_n_b: jax.Array  # (B,) ids in hist
    miss_b: jax.Array  # (B,) outright rejections in a row
    pause_b: jax.Array  # (B,) iterations left before the sequence drafts again
    backoff_b: jax.Array  # (B,) length of the next pause
    drafted_b: jax.Array  # (B,) draft tokens proposed
    accepted_b: jax.Array  # (B,) draft tokens emitted


def init(prompt_bp: jax.Array, prompt_len_b: jax.Array, state: DecodeState) -> SpecState:
    """The history after the prefill: each prompt and the first generated token."""
    batch, n_out = state.tokens_bn.shape
    hist = jnp.concatenate([prompt_bp, jnp.zeros((batch, n_out + 1), jnp.int32)], axis=1)
    rows = jnp.arange(batch)
    hist = hist.at[rows, prompt_len_b].set(state.tokens_bn[:, 0])
    zeros = jnp.zeros((batch,), jnp.int32)
    return SpecState(hist_bl=hist, hist_n_b=prompt_len_b + state.count_b, miss_b=zeros,
                     pause_b=zeros, backoff_b=zeros + BACKOFF_MIN, drafted_b=zeros,
                     accepted_b=zeros)


def propose(hist_bl: jax.Array, n_b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Drafts (B, k) and whether each sequence found one: the k ids that followed the latest
    earlier occurrence of its last n ids (n in NGRAMS, longest found first)."""
    batch, length = hist_bl.shape
    at_l = jnp.arange(length)
    found = jnp.zeros((batch,), bool)
    start = jnp.zeros((batch,), jnp.int32)
    for n in NGRAMS:
        key_bn = jnp.take_along_axis(
            hist_bl, jnp.clip(n_b[:, None] - n + jnp.arange(n)[None, :], 0, length - 1), axis=1)
        match = (at_l[None, :] + n < n_b[:, None]) & (n_b[:, None] > n)  # an earlier one
        for j in range(n):  # window at l equals the key: hist[l + j] == key[j] for every j
            shifted = jnp.pad(hist_bl[:, j:], ((0, 0), (0, j)), constant_values=-1)
            match &= shifted == key_bn[:, j:j + 1]
        latest = jnp.max(jnp.where(match, at_l[None, :], -1), axis=1)
        hit = (latest >= 0) & ~found
        start = jnp.where(hit, latest + n, start)
        found |= hit
    idx = jnp.clip(start[:, None] + jnp.arange(k)[None, :], 0, length - 1)
    return jnp.take_along_axis(hist_bl, idx, axis=1), found


def decode(model: Transformer, state: DecodeState, sp: SpecState, c: Constants,
           limit: jax.Array, k: int) -> tuple[DecodeState, SpecState]:
    """Greedy decoding with prompt-lookup drafts until every sequence is done or `limit`
    iterations (each emitting 1 .. k + 1 tokens per sequence) have run."""
    batch = state.last_b.shape[0]
    rows = jnp.arange(batch)

    def cond(carry):
        s, _ = carry
        return (s.step < limit) & ~jnp.all(s.done_b)

    def body(carry):
        s, sp = carry
        draft_bk, found_b = propose(sp.hist_bl, sp.hist_n_b, k)
        want_b = found_b & (sp.pause_b <= 0) & ~s.done_b

        def verify(_):
            toks = jnp.concatenate([s.last_b[:, None], draft_bk], axis=1)  # (B, k + 1)
            pos = s.position_b[:, None] + jnp.arange(k + 1)[None, :]
            with kernels.row_exact():
                x_btd, cache = model.cached(toks, pos, s.cache)
                logits = model.logits(x_btd)
            y = argmax(logits.reshape(batch * (k + 1), -1)).reshape(batch, k + 1)
            return y.astype(jnp.int32), cache

        def single(_):
            x_btd, cache = model.cached(s.last_b[:, None], s.position_b[:, None], s.cache)
            y0 = sample(model.logits(x_btd)[:, 0], c.sampling, s.step).astype(jnp.int32)
            return jnp.zeros((batch, k + 1), jnp.int32).at[:, 0].set(y0), cache

        y_bt, cache = jax.lax.cond(jnp.any(want_b), verify, single, None)
        agree = (draft_bk == y_bt[:, :k]) & want_b[:, None]
        m_b = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # drafts agreed
        n_emit = m_b + 1

        s = s.replace(cache=cache)
        count0, step0 = s.count_b, s.step
        hist, hist_n = sp.hist_bl, sp.hist_n_b
        for j in range(k + 1):  # each accepted token as one plain step would record it
            skip = j >= n_emit
            done0 = s.done_b
            active = ~(done0 | skip)
            s = _emit(s.replace(done_b=done0 | skip), y_bt[:, j], c)
            s = s.replace(done_b=jnp.where(skip, done0, s.done_b))
            hist = hist.at[rows, hist_n].set(jnp.where(active, y_bt[:, j],
                                                       hist[rows, hist_n]), mode="drop")
            hist_n = hist_n + active
        emitted = s.count_b - count0

        rejected = want_b & (m_b == 0)
        miss = jnp.where(want_b, jnp.where(rejected, sp.miss_b + 1, 0), sp.miss_b)
        pause_now = miss >= MISSES
        sp = sp.replace(
            hist_bl=hist, hist_n_b=hist_n,
            miss_b=jnp.where(pause_now, 0, miss),
            pause_b=jnp.where(pause_now, sp.backoff_b, jnp.maximum(sp.pause_b - 1, 0)),
            backoff_b=jnp.where(pause_now, jnp.minimum(sp.backoff_b * 2, BACKOFF_MAX),
                                jnp.where(want_b & (m_b > 0), BACKOFF_MIN, sp.backoff_b)),
            drafted_b=sp.drafted_b + jnp.where(want_b, k, 0),
            accepted_b=sp.accepted_b + jnp.where(want_b, jnp.minimum(m_b, emitted), 0))
        return s.replace(step=step0 + 1), sp

    return jax.lax.while_loop(cond, body, (state, sp))


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def generate_jit(graphdef, params, cache, prompt_bp, prompt_len_b, c: Constants, n_out: int,
                 k: int) -> tuple[DecodeState, SpecState]:
    """`engine.generate_jit` with prompt-lookup drafts of k tokens (greedy only)."""
    model = merge(graphdef, params)
    state = prefill(model, cache, prompt_bp, prompt_len_b, c, n_out)
    sp = init(prompt_bp, prompt_len_b, state)
    return decode(model, state, sp, c, c.max_new, k)
