"""Prompt-lookup speculative decoding inside the one compiled token loop.

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

Sampling (temperature > 0, with top-k / top-p as the plain sampler applies them) uses the
speculative-sampling acceptance rule: a draft is a point mass, so draft j is kept with
probability p_j(draft), and after the first rejection the token is drawn from p without the
rejected draft (the normalized residual max(0, p - q)); after k acceptances, from p itself.
Every emitted token then has exactly the plain sampler's distribution given the tokens
before it; the draws themselves differ from plain sampling's (they use other random
numbers), so sampled output is equal in distribution, not token for token.

Drafting stops paying when drafts keep failing (fresh code): a sequence whose drafts are
rejected outright twice in a row stops drafting for a back-off of 8 iterations, doubling
up to 128 while it keeps failing; an iteration in which no sequence drafts runs the plain
one-token step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from spark_model import kernels
from spark_model.engine import Constants, DecodeState, _emit, merge, prefill
from spark_model.sampling import SamplingParams, argmax, log_weights, sample
from spark_model.transformer import Transformer

MAX_DRAFT = 8  # draft_tokens is 1 .. MAX_DRAFT
NGRAMS = (3, 2)  # n-gram lengths looked up, longest first
MISSES = 2  # outright rejections in a row that pause a sequence's drafting
BACKOFF_MIN, BACKOFF_MAX = 8, 128  # iterations a pause lasts (doubling while drafts fail)


class SpeculationError(ValueError):
    """A speculative-decoding request that cannot be served (an unknown method, bad
    draft_tokens)."""


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


def _accept_sampled_row(logw_tv, draft_k, seed, step):
    """One sequence's speculative-sampling choice over k + 1 verified positions whose
    sampling log-probabilities are `logw_tv`: (drafts accepted m, token at position m)."""
    k = draft_k.shape[0]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _SALT)
    k_accept, k_draw = jax.random.split(key)
    # A draft is a point mass q(d) = 1, so draft j is kept with probability
    # min(1, p_j(d) / q(d)) = p_j(d).
    p_k = jnp.exp(logw_tv[jnp.arange(k), draft_k])
    ok_k = jax.random.uniform(k_accept, (k,)) < p_k
    m = jnp.sum(jnp.cumprod(ok_k.astype(jnp.int32)))
    # After a rejection at m the token comes from the residual max(0, p_m - q), i.e. p_m
    # without the rejected draft; after k acceptances, from p_k itself.
    w_v = logw_tv[m]
    rejected = jnp.arange(w_v.shape[0]) == draft_k[jnp.minimum(m, k - 1)]
    w_v = jnp.where((m < k) & rejected, -jnp.inf, w_v)
    return m, jax.random.categorical(k_draw, w_v).astype(jnp.int32)


_SALT = 0x5EC  # keeps the acceptance draws apart from the plain sampler's (seed, step) keys


def accept(logits_btv: jax.Array, draft_bk: jax.Array, want_b: jax.Array,
           sampling: SamplingParams, step) -> tuple[jax.Array, jax.Array]:
    """The tokens of one verify call and how many drafts each sequence accepted.

    logits (B, k + 1, V) at the latest token and the k drafts; want_b: which sequences
    drafted. Returns y (B, k + 1), whose first m_b + 1 entries a sequence emits, and m_b.
    A greedy sequence keeps the drafts its own argmax agrees with, then the argmax: the
    plain decoder's tokens. A sampled one follows the speculative-sampling rule
    (`_accept_sampled_row`), so its tokens have the plain sampler's distribution. A
    sequence that did not draft takes the plain step's token at position 0."""
    batch, t, vocab = logits_btv.shape
    k = t - 1
    step_b = jnp.broadcast_to(step, (batch,))
    greedy_bt = argmax(logits_btv.reshape(batch * t, vocab)).reshape(batch, t)
    first_b = sample(logits_btv[:, 0], sampling, step_b).astype(jnp.int32)
    sampled_b = sampling.temperature > 0
    agree = (draft_bk == greedy_bt[:, :k]) & want_b[:, None]
    m_greedy = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)

    def speculative_sampling(_):
        logw = log_weights(logits_btv.reshape(batch * t, vocab),
                           jnp.repeat(sampling.temperature, t), jnp.repeat(sampling.top_k, t),
                           jnp.repeat(sampling.top_p, t)).reshape(batch, t, vocab)
        return jax.vmap(_accept_sampled_row)(logw, draft_bk, sampling.seed, step_b)

    zeros = jnp.zeros((batch,), jnp.int32)
    m_sampled, tok_b = jax.lax.cond(jnp.any(sampled_b & want_b), speculative_sampling,
                                    lambda _: (zeros, zeros), None)
    m_b = jnp.where(want_b, jnp.where(sampled_b, m_sampled, m_greedy), 0)
    j = jnp.arange(t)[None, :]
    drafts = jnp.pad(draft_bk, ((0, 0), (0, 1)))
    y_sampled = jnp.where(j < m_b[:, None], drafts, tok_b[:, None])
    y_bt = jnp.where((sampled_b & want_b)[:, None], y_sampled, greedy_bt)
    y_bt = y_bt.at[:, 0].set(jnp.where(want_b & sampled_b, y_bt[:, 0], first_b))
    return y_bt.astype(jnp.int32), m_b


def emit_tokens(s: DecodeState, y_bt: jax.Array, n_emit_b: jax.Array, c: Constants
                ) -> tuple[DecodeState, jax.Array]:
    """Each sequence's first n_emit_b tokens of y_bt, one at a time as plain steps record
    them (so end ids, stop strings and max_new_tokens end a sequence at exactly the token
    they would have); returns the state and which tokens were emitted (B, T)."""
    kept = []
    for j in range(y_bt.shape[1]):
        skip = j >= n_emit_b
        done0 = s.done_b
        kept.append(~(done0 | skip))
        s = _emit(s.replace(done_b=done0 | skip), y_bt[:, j], c)
        s = s.replace(done_b=jnp.where(skip, done0, s.done_b))
    return s, jnp.stack(kept, axis=1)


def record(hist_bl: jax.Array, n_b: jax.Array, y_bt: jax.Array, kept_bt: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """The histories with the emitted tokens appended."""
    rows = jnp.arange(hist_bl.shape[0])
    for j in range(y_bt.shape[1]):
        hist_bl = hist_bl.at[rows, n_b].set(
            jnp.where(kept_bt[:, j], y_bt[:, j], hist_bl[rows, n_b]), mode="drop")
        n_b = n_b + kept_bt[:, j]
    return hist_bl, n_b


def backoff(sp, want_b: jax.Array, m_b: jax.Array, emitted_b: jax.Array, k: int) -> dict:
    """The back-off and count fields (miss_b, pause_b, backoff_b, drafted_b, accepted_b) of
    `sp` after an iteration in which the sequences in want_b drafted k tokens and kept m_b
    of them (emitted_b tokens were emitted in all)."""
    rejected = want_b & (m_b == 0)
    miss = jnp.where(want_b, jnp.where(rejected, sp.miss_b + 1, 0), sp.miss_b)
    pause_now = miss >= MISSES
    return dict(
        miss_b=jnp.where(pause_now, 0, miss),
        pause_b=jnp.where(pause_now, sp.backoff_b, jnp.maximum(sp.pause_b - 1, 0)),
        backoff_b=jnp.where(pause_now, jnp.minimum(sp.backoff_b * 2, BACKOFF_MAX),
                            jnp.where(want_b & (m_b > 0), BACKOFF_MIN, sp.backoff_b)),
        drafted_b=sp.drafted_b + jnp.where(want_b, k, 0),
        accepted_b=sp.accepted_b + jnp.where(want_b, jnp.minimum(m_b, emitted_b), 0))


def cond_in_place(pred: jax.Array, true_fn, false_fn, carry):
    """`lax.cond(pred, true_fn, false_fn, carry)` for functions carry -> carry (the same
    structure) that update a large buffer in it, the KV cache: run as two while loops of
    at most one trip each, whose carry XLA updates in place. (With lax.cond, XLA:CPU copied
    the whole cache on every call: a verify step cost 2.5 ms with a 1K-position cache and
    8.0 ms with an 8K one, against 1.5 ms for its forward pass.)"""
    def once(fn):
        return lambda c: (fn(c[0]), jnp.zeros((), bool))

    carry, _ = jax.lax.while_loop(lambda c: c[1], once(true_fn), (carry, pred))
    carry, _ = jax.lax.while_loop(lambda c: c[1], once(false_fn), (carry, ~pred))
    return carry


def verify_or_step(model: Transformer, cache, last_b: jax.Array, pos_b: jax.Array,
                   draft_bk: jax.Array, want_b: jax.Array, sampling: SamplingParams, step
                   ) -> tuple[Any, jax.Array, jax.Array]:
    """One iteration's model call: when any sequence drafted, the row-exact verify call over
    its latest token and k drafts and `accept`; else the plain one-token step. Returns the
    cache, y (B, k + 1) whose first m_b + 1 entries a sequence emits, and m_b."""
    batch, k = draft_bk.shape

    def verify(carry):
        cache, _, _ = carry
        toks = jnp.concatenate([last_b[:, None], draft_bk], axis=1)  # (B, k + 1)
        with kernels.row_exact():
            x_btd, cache = model.cached(toks, pos_b[:, None] + jnp.arange(k + 1), cache)
            logits = model.logits(x_btd)
        y_bt, m_b = accept(logits, draft_bk, want_b, sampling, step)
        return cache, y_bt, m_b

    def single(carry):
        cache, y_bt, m_b = carry
        x_btd, cache = model.cached(last_b[:, None], pos_b[:, None], cache)
        y0 = sample(model.logits(x_btd)[:, 0], sampling, step).astype(jnp.int32)
        return cache, y_bt.at[:, 0].set(y0), m_b

    zeros = (jnp.zeros((batch, k + 1), jnp.int32), jnp.zeros((batch,), jnp.int32))
    return cond_in_place(jnp.any(want_b), verify, single, (cache, *zeros))


def decode(model: Transformer, state: DecodeState, sp: SpecState, c: Constants,
           limit: jax.Array, k: int) -> tuple[DecodeState, SpecState]:
    """Decoding with prompt-lookup drafts until every sequence is done or `limit`
    iterations (each emitting 1 .. k + 1 tokens per sequence) have run."""
    def cond(carry):
        s, _ = carry
        return (s.step < limit) & ~jnp.all(s.done_b)

    def body(carry):
        s, sp = carry
        draft_bk, found_b = propose(sp.hist_bl, sp.hist_n_b, k)
        want_b = found_b & (sp.pause_b <= 0) & ~s.done_b

        cache, y_bt, m_b = verify_or_step(model, s.cache, s.last_b, s.position_b, draft_bk,
                                          want_b, c.sampling, s.step)
        n_emit = m_b + 1

        count0, step0 = s.count_b, s.step
        s, kept_bt = emit_tokens(s.replace(cache=cache), y_bt, n_emit, c)
        hist, hist_n = record(sp.hist_bl, sp.hist_n_b, y_bt, kept_bt)
        emitted = s.count_b - count0

        sp = sp.replace(hist_bl=hist, hist_n_b=hist_n, **backoff(sp, want_b, m_b, emitted, k))
        return s.replace(step=step0 + 1), sp

    return jax.lax.while_loop(cond, body, (state, sp))


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def generate_jit(graphdef, params, cache, prompt_bp, prompt_len_b, c: Constants, n_out: int,
                 k: int) -> tuple[DecodeState, SpecState]:
    """`engine.generate_jit` with prompt-lookup drafts of k tokens."""
    model = merge(graphdef, params)
    state = prefill(model, cache, prompt_bp, prompt_len_b, c, n_out)
    sp = init(prompt_bp, prompt_len_b, state)
    return decode(model, state, sp, c, c.max_new, k)
