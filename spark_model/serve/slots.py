"""The serving engine's device side: B batch slots over one persistent KV cache.

Requests are admitted into free slots by prefilling their prompts (the same chunked
prefill `generate` runs; requests that arrive together are prefilled together) and
copying the prompts' keys and values into those slots' rows of the batched cache. The
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
from einops import rearrange
from flax import struct

from spark_model import engine, stops
from spark_model.engine import Constants, DecodeState
from spark_model.kv_cache import KVCache, init_cache
from spark_model.modules import masked_attention
from spark_model.sampling import SamplingParams, sample
from spark_model.serve import prefix_cache

STOP_WIDTH = 64  # bytes per stop string (the tail each slot keeps for matching)


@struct.dataclass
class RowSettings:
    """Settings of n requests, each array with a leading axis n (installed into n slots)."""

    sampling: SamplingParams
    stop_spec: stops.StopSpec  # bytes (n, MAX_STOPS, STOP_WIDTH), lengths (n, MAX_STOPS)
    max_new: jax.Array  # (n,) int32
    end_ids: jax.Array  # (n, E) int32 end ids; -1 entries (all, to ignore them) match none

    @classmethod
    def make(cls, temperature: float, top_k: int, top_p: float, seed: int,
             stop: list[str], max_new: int, end_ids: np.ndarray) -> "RowSettings":
        """One request's settings (n = 1), as host arrays; end_ids is a
        `generation.end_id_vector` (E,)."""
        stop_rows, stop_lengths = stops.StopSpec.host_arrays(stop, STOP_WIDTH)
        return cls(
            sampling=SamplingParams(temperature=np.array([temperature], np.float32),
                                    top_k=np.array([top_k], np.int32),
                                    top_p=np.array([top_p], np.float32),
                                    seed=np.array([seed], np.uint32)),
            stop_spec=stops.StopSpec(stop_rows[None], stop_lengths[None]),
            max_new=np.array([max_new], np.int32),
            end_ids=np.asarray(end_ids, np.int32)[None])

    @staticmethod
    def stack(rows: list["RowSettings"]) -> "RowSettings":
        return jax.tree.map(lambda *xs: np.concatenate(xs), *rows)

    def to_constants(self, shared: Constants) -> Constants:
        """These per-row settings in a Constants whose token tables come from `shared`."""
        return shared.replace(sampling=self.sampling, stop_spec=self.stop_spec,
                              max_new=self.max_new, end_ids=self.end_ids)


_PER_ROW = ("sampling", "stop_spec", "max_new", "end_ids")  # Constants fields set per slot


def _rows(c: Constants, f) -> Constants:
    """Apply f to every per-slot field of c (the token tables are shared)."""
    return c.replace(**{name: jax.tree.map(f, getattr(c, name)) for name in _PER_ROW})


@struct.dataclass
class Slots:
    """The batch: decode state and per-slot settings, every array with leading axis B."""

    state: DecodeState  # tokens_bn holds each slot's generated ids (N = capacity)
    consts: Constants  # per-slot sampling, stop_spec and max_new; shared token tables
    scratch: KVCache  # B rows that admissions prefill into (reused, never cleared)


def init_slots(cfg, batch: int, capacity: int, token_table: tuple[np.ndarray, np.ndarray],
               end_ids: np.ndarray) -> Slots:
    """All slots free (done). Committed to the default device, like the engine's outputs,
    so the first call and later ones hit the same compiled programs."""
    dev = jax.devices()[0]
    put = functools.partial(jax.device_put, device=dev)
    table, lengths = token_table
    shared = Constants(sampling=None, stop_spec=None, token_bytes_vw=jnp.asarray(table),
                       token_len_v=jnp.asarray(lengths), max_new=None, end_ids=None)
    empty = jax.tree.map(jnp.asarray,
                         RowSettings.make(0.0, 0, 1.0, 0, [], 1, end_ids).to_constants(shared))
    consts = _rows(empty, lambda x: jnp.repeat(x, batch, axis=0))
    state = DecodeState(
        cache=init_cache(cfg, batch, capacity, dev),
        tokens_bn=jnp.zeros((batch, capacity), jnp.int32),
        count_b=jnp.zeros((batch,), jnp.int32), last_b=jnp.zeros((batch,), jnp.int32),
        position_b=jnp.zeros((batch,), jnp.int32), done_b=jnp.ones((batch,), bool),
        tail_bm=stops.empty_tail(batch, STOP_WIDTH), step=jnp.zeros((), jnp.int32))
    return put(Slots(state=state, consts=consts,
                     scratch=init_cache(cfg, batch, capacity, dev)))


_ROW_FIELDS = ("tokens_bn", "count_b", "last_b", "position_b", "done_b", "tail_bm")


def _put_row(big: jax.Array, row: jax.Array, slot: jax.Array) -> jax.Array:
    """Write (n, ...) rows into slots slot .. slot + n - 1 of a (B, ...) array (in place
    when donated)."""
    start = (slot,) + (jnp.zeros((), slot.dtype),) * (big.ndim - 1)
    return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), start)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def admit_jit(graphdef, params, slots: Slots, slot_n: jax.Array, prompt_np: jax.Array,
              prompt_len_n: jax.Array, rows: RowSettings
              ) -> tuple[Slots, jax.Array, jax.Array]:
    """Prefill n prompts together and install each, with its settings, in slot slot_n[i];
    also return their first tokens and whether each already ended there.

    The prompts run through the first n rows of the scratch cache (the chunked prefill of
    `generate`), then only their bucket's positions are copied into the slots' rows: the
    rest of the batch's cache is neither read nor rewritten. The scratch needs no
    clearing: prefill writes every position it reads. (A caller that pads a group by
    repeating a request is safe: a repeated row writes the same values into the same slot.)
    """
    model = engine.merge(graphdef, params)
    n, p = prompt_np.shape
    c = rows.to_constants(slots.consts)
    first = engine.prefill(model, slots.scratch, prompt_np, prompt_len_n, c,
                           slots.state.tokens_bn.shape[1])
    keep = min(p, slots.state.cache.length)  # positions worth copying: the (padded) prompt
    def row_kv(x_rksh, i):  # request i's prompt positions, from its scratch row
        return x_rksh[i:i + 1, :, :keep]

    new = _install(slots, slot_n, first, c, [(row_kv, k, v) for k, v in
                                             zip(first.cache.k, first.cache.v)])
    return new.replace(scratch=first.cache), first.last_b, first.done_b


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def admit_packed_jit(graphdef, params, slots: Slots, slot_n: jax.Array, tokens_p: jax.Array,
                     start_n: jax.Array, prompt_len_n: jax.Array, rows: RowSettings
                     ) -> tuple[Slots, jax.Array, jax.Array]:
    """`admit_jit` for short prompts, packed: prompt i is tokens_p[start_n[i]:][:len_n[i]].

    One sequence of P tokens holds every prompt back to back, each at its own positions
    0 .. len - 1 and seeing only its own earlier tokens, so a group of short prompts costs
    the tokens it has rather than n times the longest (a batch of rows pads each prompt to
    the longest one). Prompt i's keys and values are then copied into slot_n[i]'s row: P
    positions from its start, of which those past its end are padding that the request
    overwrites before it ever reads them. Needs start_n[i] + P <= 2P, always true.
    """
    model = engine.merge(graphdef, params)
    p = tokens_p.shape[0]
    c = rows.to_constants(slots.consts)
    seg_p = jnp.sum(jnp.arange(p)[:, None] >= start_n[None, :], axis=1)  # prompt of each token
    pos_p = jnp.arange(p) - start_n[seg_p - 1]  # position inside its own prompt
    mask_ts = (seg_p[:, None] == seg_p[None, :]) & (jnp.arange(p)[None, :] <= jnp.arange(p)[:, None])

    def attend(q, k, v):
        return masked_attention(q, k, v, mask_ts), (k, v)

    x_1pd, kvs = model.hidden(tokens_p[None], pos_p[None], [attend] * model.cfg.n_layers)
    last_nd = x_1pd[0, start_n + prompt_len_n - 1]
    first = engine.first_token(None, model.logits(last_nd[:, None])[:, 0], prompt_len_n, c,
                               slots.state.tokens_bn.shape[1])

    def row_kv(x_1pkh, i):  # (1, K, P, H): P positions from prompt i's start
        padded = jnp.concatenate([x_1pkh, jnp.zeros_like(x_1pkh)], axis=1)
        block = jax.lax.dynamic_slice_in_dim(padded, start_n[i], p, axis=1)
        return rearrange(block, "1 p k h -> 1 k p h")

    new = _install(slots, slot_n, first, c, [(row_kv, k, v) for k, v in kvs])
    return new, first.last_b, first.done_b


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def admit_cached_jit(graphdef, params, slots: Slots, pool: prefix_cache.Pool,
                     slot_n: jax.Array, start_n: jax.Array, prompt_np: jax.Array,
                     prompt_len_n: jax.Array, rows: RowSettings, blocks: prefix_cache.Copies
                     ) -> tuple[Slots, jax.Array, jax.Array]:
    """`admit_jit` for prompts whose first start_n[i] positions the prefix cache holds:
    prompt_np holds only the rest of each prompt (prompt_len_n tokens).

    The cached blocks (`blocks`: row_m is the request's index i, pos_m where the block
    starts, pool_m its pool block) are copied into the scratch rows, the rest is prefilled
    after them, and each slot's row gets the cached blocks, again from the pool, and the
    P prefilled positions from start_n[i] (the caller keeps start_n[i] + P within the
    cache, so no slice is clamped).
    """
    model = engine.merge(graphdef, params)
    n, p = prompt_np.shape
    c = rows.to_constants(slots.consts)
    scratch = prefix_cache.restore(slots.scratch, pool, blocks.row_m, blocks.pos_m,
                                   blocks.pool_m, blocks.count)
    first = engine.prefill(model, scratch, prompt_np, prompt_len_n, c,
                           slots.state.tokens_bn.shape[1], start_n)
    big = prefix_cache.restore(slots.state.cache, pool, slot_n[blocks.row_m], blocks.pos_m,
                               blocks.pool_m, blocks.count)
    zero = jnp.zeros((), jnp.int32)

    def install(big_x, small_x):  # request i's P new positions, from start_n[i]
        for i in range(n):
            at = (slot_n[i], zero, start_n[i], zero)
            new = jax.lax.dynamic_slice(small_x, (i + zero, zero, start_n[i], zero),
                                        (1, small_x.shape[1], p, small_x.shape[3]))
            big_x = jax.lax.dynamic_update_slice(big_x, new, at)
        return big_x

    cache = KVCache(k=tuple(install(b, s) for b, s in zip(big.k, first.cache.k)),
                    v=tuple(install(b, s) for b, s in zip(big.v, first.cache.v)))
    new = _install_rows(slots, slot_n, first, c, cache)
    return new.replace(scratch=first.cache), first.last_b, first.done_b


def _install(slots: Slots, slot_n, first: DecodeState, c: Constants, layers) -> Slots:
    """Copy n admitted requests into their slots: each layer's keys and values
    (row_kv(x, i) gives request i's block, written from position 0 of its row), the
    per-row decode state, and the per-row settings."""
    big = slots.state.cache
    n = slot_n.shape[0]

    def install(big_x, row_kv, small_x):
        for i in range(n):
            big_x = _put_row(big_x, row_kv(small_x, i), slot_n[i])
        return big_x

    cache = KVCache(k=tuple(install(bk, f, k) for bk, (f, k, _) in zip(big.k, layers)),
                    v=tuple(install(bv, f, v) for bv, (f, _, v) in zip(big.v, layers)))
    return _install_rows(slots, slot_n, first, c, cache)


def _install_rows(slots: Slots, slot_n, first: DecodeState, c: Constants, cache: KVCache
                  ) -> Slots:
    """The slots with the batch cache `cache` and, in slot_n[i], request i's decode state
    and settings."""
    n = slot_n.shape[0]

    def put_rows(big_x, rows_x):
        for i in range(n):
            big_x = _put_row(big_x, rows_x[i:i + 1], slot_n[i])
        return big_x

    state = slots.state.replace(cache=cache, **{
        f: put_rows(getattr(slots.state, f), getattr(first, f)) for f in _ROW_FIELDS})
    consts = slots.consts.replace(**{
        name: jax.tree.map(put_rows, getattr(slots.consts, name), getattr(c, name))
        for name in _PER_ROW})
    return slots.replace(state=state, consts=consts)


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
    model = engine.merge(graphdef, params)
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
