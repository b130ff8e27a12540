"""The serving engine's device side: B batch slots over one persistent KV cache.

A request is admitted into a free slot by prefilling its prompt alone (batch 1, the same
chunked prefill `generate` runs, so its first token is the one `generate` would pick) and
copying the prompt's keys and values into that slot's row of the batched cache. The
batch then decodes a few steps at a time for every slot at once; finished and free slots
ride along as "done" rows whose results are ignored.

Everything that varies per request is a traced array indexed by slot: sampling settings and
seed, stop strings, the token budget. The slot index is traced too, so admitting into any
slot, with any settings, reuses one compiled program per prompt-length bucket.

Numerics: rows never mix. A done row queries position 0, so the attention loops' trip
count (set by the furthest position queried) follows the live rows only; blocks a row
does not reach contribute exact zeros. A row's sampling step is its own token count,
which is the step `generate` uses for the same token, so seeded sampling draws the same
random numbers whether a request runs alone or in a full batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spark_model import engine, stops
from spark_model.engine import Constants, DecodeState
from spark_model.kv_cache import KVCache, init_cache
from spark_model.sampling import SamplingParams, sample

STOP_WIDTH = 64  # bytes per stop string (the tail each slot keeps for matching)


@struct.dataclass
class RowSettings:
    """One request's settings as arrays with a leading axis of 1 (inserted into a slot)."""

    sampling: SamplingParams
    stop_spec: stops.StopSpec  # bytes (1, MAX_STOPS, STOP_WIDTH), lengths (1, MAX_STOPS)
    max_new: jax.Array  # (1,) int32
    eos_id: jax.Array  # (1,) int32; -1 (matches no token) to generate past the end of text

    @classmethod
    def make(cls, temperature: float, top_k: int, top_p: float, seed: int,
             stop: list[str], max_new: int, eos_id: int) -> "RowSettings":
        spec = stops.StopSpec.make(stop, STOP_WIDTH)
        return cls(sampling=SamplingParams.make(1, temperature, top_k, top_p,
                                                np.array([seed], np.uint32)),
                   stop_spec=stops.StopSpec(spec.bytes_sm[None], spec.lengths_s[None]),
                   max_new=jnp.array([max_new], jnp.int32),
                   eos_id=jnp.array([eos_id], jnp.int32))

    def to_constants(self, shared: Constants) -> Constants:
        """These per-row settings in a Constants whose token tables come from `shared`."""
        return shared.replace(sampling=self.sampling, stop_spec=self.stop_spec,
                              max_new=self.max_new, eos_id=self.eos_id)


_PER_ROW = ("sampling", "stop_spec", "max_new", "eos_id")  # Constants fields set per slot


def _rows(c: Constants, f) -> Constants:
    """Apply f to every per-slot field of c (the token tables are shared)."""
    return c.replace(**{name: jax.tree.map(f, getattr(c, name)) for name in _PER_ROW})


@struct.dataclass
class Slots:
    """The batch: decode state and per-slot settings, every array with leading axis B."""

    state: DecodeState  # tokens_bn holds each slot's generated ids (N = capacity)
    consts: Constants  # per-slot sampling, stop_spec and max_new; shared token tables
    scratch: KVCache  # a one-row cache that admissions prefill into (reused, never cleared)


def init_slots(cfg, batch: int, capacity: int, token_table: tuple[np.ndarray, np.ndarray],
               eos_id: int) -> Slots:
    """All slots free (done). Committed to the default device, like the engine's outputs,
    so the first call and later ones hit the same compiled programs."""
    dev = jax.devices()[0]
    put = functools.partial(jax.device_put, device=dev)
    table, lengths = token_table
    shared = Constants(sampling=None, stop_spec=None, token_bytes_vw=jnp.asarray(table),
                       token_len_v=jnp.asarray(lengths), max_new=None, eos_id=None)
    empty = RowSettings.make(0.0, 0, 1.0, 0, [], 1, eos_id).to_constants(shared)
    consts = _rows(empty, lambda x: jnp.repeat(x, batch, axis=0))
    state = DecodeState(
        cache=init_cache(cfg, batch, capacity, dev),
        tokens_bn=jnp.zeros((batch, capacity), jnp.int32),
        count_b=jnp.zeros((batch,), jnp.int32), last_b=jnp.zeros((batch,), jnp.int32),
        position_b=jnp.zeros((batch,), jnp.int32), done_b=jnp.ones((batch,), bool),
        tail_bm=stops.empty_tail(batch, STOP_WIDTH), step=jnp.zeros((), jnp.int32))
    return put(Slots(state=state, consts=consts, scratch=init_cache(cfg, 1, capacity, dev)))


_ROW_FIELDS = ("tokens_bn", "count_b", "last_b", "position_b", "done_b", "tail_bm")


def _put_row(big: jax.Array, row: jax.Array, slot: jax.Array) -> jax.Array:
    """Write (n, ...) rows into slots slot .. slot + n - 1 of a (B, ...) array (in place
    when donated)."""
    start = (slot,) + (jnp.zeros((), slot.dtype),) * (big.ndim - 1)
    return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), start)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def admit_jit(graphdef, params, slots: Slots, slot: jax.Array, prompt_1p: jax.Array,
              prompt_len_1: jax.Array, row: RowSettings
              ) -> tuple[Slots, jax.Array, jax.Array]:
    """Prefill one prompt and install it, with its settings, in slot `slot`; also return
    its first token and whether that token already ended it.

    The prompt runs through the one-row scratch cache, then only its bucket's positions
    are copied into the slot's row: the rest of the batch's cache is neither read nor
    rewritten. The scratch needs no clearing: prefill writes every position it reads.
    """
    model = nnx.merge(graphdef, params)
    big = slots.state.cache
    p = prompt_1p.shape[1]
    c = row.to_constants(slots.consts)
    n_out = slots.state.tokens_bn.shape[1]
    first = engine.prefill(model, slots.scratch, prompt_1p, prompt_len_1, c, n_out)
    keep = min(p, big.length)  # positions worth copying: the (padded) prompt

    def install(big_x, small_x):
        return _put_row(big_x, small_x[:, :, :keep], slot)

    cache = KVCache(k=tuple(map(install, big.k, first.cache.k)),
                    v=tuple(map(install, big.v, first.cache.v)))
    state = slots.state.replace(cache=cache, **{
        f: _put_row(getattr(slots.state, f), getattr(first, f), slot) for f in _ROW_FIELDS})
    consts = slots.consts.replace(**{
        name: jax.tree.map(lambda b, r: _put_row(b, r, slot), getattr(slots.consts, name),
                           getattr(c, name)) for name in _PER_ROW})
    return (Slots(state=state, consts=consts, scratch=first.cache),
            first.last_b[0], first.done_b[0])


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=(2,))
def decode_jit(graphdef, params, slots: Slots, keep_b: jax.Array, n_steps: int, width: int
               ) -> tuple[Slots, jax.Array]:
    """Up to n_steps tokens for each of the first `width` slots; returns the slots and the
    (width, n_steps) ids each of them generated in this call (-1 past its end).

    Only slots [0, width) are stepped: the scheduler fills the lowest free slot first and
    picks the smallest compiled width (1, 2, 4 ... B) that covers every busy slot, so a
    lone request pays for a batch of one, not B. The cache stays whole (its rows past
    `width` are neither read nor written). keep_b False retires a slot now (its request
    was cancelled or its client left); the loop exits early once every slot is done.
    """
    model = nnx.merge(graphdef, params)
    full = slots.state
    c = _rows(slots.consts, lambda x: x[:width])
    s0 = full.replace(**{f: getattr(full, f)[:width] for f in _ROW_FIELDS})
    s0 = s0.replace(done_b=s0.done_b | ~keep_b[:width])
    start_b = s0.count_b

    def cond(carry):
        i, s = carry
        return (i < n_steps) & ~jnp.all(s.done_b)

    def body(carry):
        i, s = carry
        pos_b = jnp.where(s.done_b, 0, s.position_b)  # done rows do not widen attention
        x_btd, cache = model.cached(s.last_b[:, None], pos_b[:, None], s.cache)
        token_b = sample(model.logits(x_btd)[:, 0], c.sampling, s.count_b)
        return i + 1, engine._emit(s.replace(cache=cache), token_b, c)

    _, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s0))
    idx = start_b[:, None] + jnp.arange(n_steps)[None, :]
    new = jnp.take_along_axis(s.tokens_bn, jnp.minimum(idx, s.tokens_bn.shape[1] - 1), axis=1)
    new = jnp.where(idx < s.count_b[:, None], new, -1)
    zero = jnp.zeros((), jnp.int32)
    state = s.replace(**{f: _put_row(getattr(full, f), getattr(s, f), zero)
                         for f in _ROW_FIELDS})
    return slots.replace(state=state), new
