"""Prompt-lookup speculation in the serving engine's slots (`spark_model.speculative`'s
drafts and verify step, run over the persistent batch of `spark_model.serve.slots`).

Design: speculation is a per-slot flag, not a separate batch. A slot speculates when the
server enables it and its request did not opt out. While any busy slot speculates, the
engine's decode calls run `decode_jit` below instead of `slots.decode_jit`: each
iteration, slots that speculate and found a draft propose k tokens, and one call of the
model over k + 1 positions per slot (traced inside `kernels.row_exact()`, so every row is
computed exactly as a one-token step computes it) verifies them; `speculative.accept`
keeps a greedy slot's drafts by argmax and a sampled slot's by the speculative-sampling
rule, each with the slot's own settings and step. The other slots take only the first of
those rows, sampled with their own settings and step, so their tokens are the ones the
plain decode call gives. Separate batches would
keep a speculating request from sharing the decode loop with others (and a slot's cache
row cannot move between batches), so continuous batching and the prefix cache would be
lost; per-slot flags keep one batch and one cache.

Each slot's history (its prompt, then its generated ids) is rebuilt at the start of each
call from the prompt stored at admission and the slot's `tokens_bn`, so plain calls in
between need not maintain it. The back-off state (outright misses, pause) lives per slot,
as in `spark_model.speculative`, and so do the drafted and accepted counts of the slot's
current request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spark_model import engine
from spark_model.serve.slots import _ROW_FIELDS, Slots, _put_row, _rows
from spark_model.speculative import (BACKOFF_MIN, backoff, emit_tokens, propose, record,
                                     verify_or_step)

METHODS = ("prompt_lookup",)  # what `spark serve --speculative` accepts


@struct.dataclass
class SpecSlots:
    """Per-slot speculation state, every array with leading axis B."""

    prompt_bl: jax.Array  # (B, L) each slot's prompt ids from position 0 (L = capacity)
    on_b: jax.Array  # (B,) bool: the slot's request drafts
    miss_b: jax.Array  # (B,) outright rejections in a row
    pause_b: jax.Array  # (B,) iterations left before the slot drafts again
    backoff_b: jax.Array  # (B,) length of the next pause
    drafted_b: jax.Array  # (B,) draft tokens proposed for the slot's request
    accepted_b: jax.Array  # (B,) draft tokens of it that were emitted


_SPEC_ROWS = ("on_b", "miss_b", "pause_b", "backoff_b", "drafted_b", "accepted_b")


def init_spec(batch: int, capacity: int) -> SpecSlots:
    """No slot speculating; committed to the default device like the slots."""
    def zeros():  # a buffer of its own each (the state is donated)
        return jnp.zeros((batch,), jnp.int32)

    spec = SpecSlots(prompt_bl=jnp.zeros((batch, capacity), jnp.int32),
                     on_b=jnp.zeros((batch,), bool), miss_b=zeros(), pause_b=zeros(),
                     backoff_b=zeros() + BACKOFF_MIN, drafted_b=zeros(), accepted_b=zeros())
    return jax.device_put(spec, jax.devices()[0])


def host_prompts(ids: list[list[int]], capacity: int) -> np.ndarray:
    """(n, capacity) int32: each prompt from position 0, zeros after it."""
    out = np.zeros((len(ids), capacity), np.int32)
    for row, x in zip(out, ids):
        row[:min(len(x), capacity)] = x[:capacity]
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def install_jit(spec: SpecSlots, slot_n: jax.Array, prompt_nl: jax.Array, on_n: jax.Array
                ) -> SpecSlots:
    """Admit n requests: slot slot_n[i] gets prompt i, flag on_n[i] and fresh counts."""
    n = slot_n.shape[0]
    fresh = {"on_b": on_n.astype(bool), "miss_b": jnp.zeros((n,), jnp.int32),
             "pause_b": jnp.zeros((n,), jnp.int32),
             "backoff_b": jnp.full((n,), BACKOFF_MIN, jnp.int32),
             "drafted_b": jnp.zeros((n,), jnp.int32), "accepted_b": jnp.zeros((n,), jnp.int32)}
    fields = {"prompt_bl": prompt_nl, **fresh}
    out = {}
    for name, rows in fields.items():
        big = getattr(spec, name)
        for i in range(n):
            big = _put_row(big, rows[i:i + 1], slot_n[i])
        out[name] = big
    return spec.replace(**out)


def _history(spec: SpecSlots, s: engine.DecodeState) -> tuple[jax.Array, jax.Array]:
    """(B, L) each slot's ids by position (prompt, then generated; zeros after) and (B,)
    how many: the prompt is position_b + 1 - count_b ids long."""
    length = spec.prompt_bl.shape[1]
    at_l = jnp.arange(length)[None, :]
    n_b = s.position_b + 1
    plen_b = (n_b - s.count_b)[:, None]
    gen = jnp.take_along_axis(s.tokens_bn, jnp.clip(at_l - plen_b, 0, length - 1), axis=1)
    hist = jnp.where(at_l < plen_b, spec.prompt_bl, jnp.where(at_l < n_b[:, None], gen, 0))
    return hist, n_b


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(2, 3))
def decode_jit(graphdef, params, slots: Slots, spec: SpecSlots, keep_b: jax.Array,
               n_steps: int, width: int, k: int
               ) -> tuple[Slots, SpecSlots, jax.Array, jax.Array]:
    """`slots.decode_jit` with drafts of k tokens for the slots whose flag is on: up to
    n_steps iterations (each 1 .. k + 1 tokens per slot) for the first `width` slots.
    Returns the slots, the speculation state, the (width, n_steps * (k + 1)) ids each slot
    generated in this call (-1 past its end) and the number of iterations run."""
    model = engine.merge(graphdef, params)
    c, s0, sp0 = narrow(slots, spec, keep_b, width)
    hist0, n0 = _history(sp0.replace(prompt_bl=spec.prompt_bl[:width]), s0)

    def cond(carry):
        i, s, _, _, _ = carry
        return (i < n_steps) & ~jnp.all(s.done_b)

    def body(carry):
        i, s, sp, hist, hist_n = carry
        pos_b = jnp.where(s.done_b, 0, s.position_b)  # done rows do not widen attention
        draft_bk, found_b = propose(hist, hist_n, k)
        want_b = found_b & sp.on_b & (sp.pause_b <= 0) & ~s.done_b

        cache, y_bt, m_b = verify_or_step(model, s.cache, s.last_b, pos_b, draft_bk, want_b,
                                          c.sampling, s.count_b)
        n_emit = m_b + 1

        count0 = s.count_b
        s, kept_bt = emit_tokens(s.replace(cache=cache), y_bt, n_emit, c)
        hist, hist_n = record(hist, hist_n, y_bt, kept_bt)
        emitted = s.count_b - count0

        sp = sp.replace(**backoff(sp, want_b, m_b, emitted, k))
        return i + 1, s, sp, hist, hist_n

    iters, s, sp, _, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), s0, sp0, hist0, n0))
    slots, spec, new = widen(slots, spec, s0, s, sp, n_steps * (k + 1))
    return slots, spec, new, iters


def narrow(slots: Slots, spec: SpecSlots, keep_b: jax.Array, width: int
           ) -> tuple[engine.Constants, engine.DecodeState, SpecSlots]:
    """The first `width` slots' settings, decode state (the cache whole; a slot with keep_b
    False retired) and speculation rows, for a decode call over them."""
    full = slots.state
    c = _rows(slots.consts, lambda x: x[:width])
    s0 = full.replace(**{f: getattr(full, f)[:width] for f in _ROW_FIELDS})
    s0 = s0.replace(done_b=s0.done_b | ~keep_b[:width])
    sp0 = spec.replace(**{f: getattr(spec, f)[:width] for f in _SPEC_ROWS})
    return c, s0, sp0


def widen(slots: Slots, spec: SpecSlots, s0: engine.DecodeState, s: engine.DecodeState,
          sp: SpecSlots, n_out: int) -> tuple[Slots, SpecSlots, jax.Array]:
    """`narrow`'s rows written back after the call (s0 before it, s and sp after), and the
    (width, n_out) ids each slot generated in the call (-1 past its end)."""
    idx = s0.count_b[:, None] + jnp.arange(n_out)[None, :]
    new = jnp.take_along_axis(s.tokens_bn, jnp.minimum(idx, s.tokens_bn.shape[1] - 1), axis=1)
    new = jnp.where(idx < s.count_b[:, None], new, -1)
    zero = jnp.zeros((), jnp.int32)
    state = s.replace(**{f: _put_row(getattr(slots.state, f), getattr(s, f), zero)
                         for f in _ROW_FIELDS})
    spec = spec.replace(**{f: _put_row(getattr(spec, f), getattr(sp, f), zero)
                           for f in _SPEC_ROWS})
    return slots.replace(state=state), spec, new
