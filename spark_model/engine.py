"""The decode engine: chunked prefill and the token loop, each compiled whole with jax.jit.

All state of generation lives in one `DecodeState`; the model's parameters are a jit
*argument* (the graph definition is the only static part), and the KV cache is donated so
XLA updates it in place. Shapes that reach the compiler are bucketed (prompt length and
output length to powers of two), so new prompt lengths reuse the same programs; everything
a user varies per call (sampling settings, seeds, stop strings, max_new_tokens) is traced.

    generate = prefill + decode(limit=max_new_tokens)   one program, no per-token Python
    stream   = prefill, then decode(limit=k) repeatedly  text arrives after prefill + 1 step
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spark_model import stops
from spark_model.kv_cache import KVCache
from spark_model.sampling import SamplingParams, sample
from spark_model.transformer import Transformer

PREFILL_CHUNK = 512  # prompt tokens per prefill iteration over a long prompt
# A padded prompt up to this long is prefilled in one iteration: each iteration expands
# every packed weight for the AMX tiles once, so SmolLM2 at q8_0 took 719-754 ms to first
# token on a 1,000-token prompt in two iterations and 660-678 ms in one (alternating runs).
# Longer prompts keep 512-token iterations, which pad a prompt by less than 1,024-token ones
# would.
SINGLE_CHUNK = 1024
# Ids that end a sequence, per call (or per slot): a fixed width E, so one compiled program
# serves a tokenizer with one end id and one with several (SmolLM2 ends on <|im_end|> and
# <|endoftext|>, Llama 3 on three ids). Unused entries hold -1, which matches no token.
MAX_END_IDS = 4


def prefill_chunk(p: int) -> int:
    """Tokens per prefill iteration for prompts padded to p (the chunk shape)."""
    return p if p <= SINGLE_CHUNK else min(p, PREFILL_CHUNK)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): the shape a length is padded to."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@struct.dataclass
class Constants:
    """Per-call inputs that do not change during the loop (all traced)."""

    sampling: SamplingParams
    stop_spec: stops.StopSpec
    token_bytes_vw: jax.Array  # (V, W) int16 bytes of each token, for stop matching
    token_len_v: jax.Array  # (V,) int32
    max_new: jax.Array  # () int32: tokens to generate at most, per sequence
    end_ids: jax.Array  # (E,) int32, or (B, E) per row; -1 entries match no token


@struct.dataclass
class DecodeState:
    """Everything the loop carries."""

    cache: KVCache
    tokens_bn: jax.Array  # (B, N) generated ids; slots past count_b are unused
    count_b: jax.Array  # (B,) tokens generated so far
    last_b: jax.Array  # (B,) the latest generated token, fed to the next step
    position_b: jax.Array  # (B,) position of last_b in its sequence
    done_b: jax.Array  # (B,) finished: an end id, a stop string or max_new reached
    tail_bm: jax.Array  # (B, M) last bytes generated, for stop strings
    step: jax.Array  # () steps taken; seeds each step's random draw


def _emit(state: DecodeState, token_b: jax.Array, c: Constants) -> DecodeState:
    """Record one sampled token per still-running sequence and update stop conditions."""
    active = ~state.done_b
    rows = jnp.arange(token_b.shape[0])
    tokens = state.tokens_bn.at[rows, state.count_b].set(
        jnp.where(active, token_b, state.tokens_bn[rows, state.count_b]), mode="drop")
    tail, hit_stop = stops.advance(state.tail_bm, token_b, c.token_bytes_vw, c.token_len_v,
                                   c.stop_spec)
    count = state.count_b + active
    done = state.done_b | (active & (
        jnp.any(token_b[:, None] == c.end_ids, axis=-1)  # the model ended the text
        | hit_stop  # a stop string ended inside this token
        | (count >= c.max_new)))  # the caller's budget is spent
    return state.replace(
        tokens_bn=tokens, count_b=count,
        last_b=jnp.where(active, token_b, state.last_b),
        position_b=state.position_b + active,
        done_b=done, tail_bm=jnp.where(active[:, None], tail, state.tail_bm),
        step=state.step + 1)


def prefill(model: Transformer, cache: KVCache, prompt_bp: jax.Array, prompt_len_b: jax.Array,
            c: Constants, n_out: int, start_b: jax.Array | None = None) -> DecodeState:
    """Run the prompts through the cache in chunks and sample the first token.

    prompt_bp is right-padded to a bucket P; only ceil(max(len) / chunk) chunks run, so
    padding costs nothing beyond the last chunk. Positions past a prompt's end receive
    padding keys, which that sequence overwrites before it ever attends to them.
    start_b is the position of each prompt's first token: 0 (the default) starts fresh
    sequences; a later position continues sequences whose earlier positions the cache
    already holds (a shared context prefilled once).
    """
    batch, p = prompt_bp.shape
    if start_b is None:
        start_b = jnp.zeros((batch,), jnp.int32)
    chunk = prefill_chunk(p)
    n_chunks = (jnp.max(prompt_len_b) + chunk - 1) // chunk
    rows = jnp.arange(batch)

    def body(j, carry):
        cache, last_bd = carry
        toks = jax.lax.dynamic_slice_in_dim(prompt_bp, j * chunk, chunk, axis=1)
        pos = start_b[:, None] + j * chunk + jnp.arange(chunk)[None, :]
        x_btd, cache = model.cached(toks, pos, cache)
        idx = prompt_len_b - 1 - j * chunk  # where the prompt's last token sits in this chunk
        inside = (idx >= 0) & (idx < chunk)
        h_bd = x_btd[rows, jnp.clip(idx, 0, chunk - 1)]
        return cache, jnp.where(inside[:, None], h_bd, last_bd)

    last = jnp.zeros((batch, model.cfg.d_model), jnp.dtype(model.cfg.dtype))
    cache, last = jax.lax.fori_loop(0, n_chunks, body, (cache, last))
    return first_token(cache, model.logits(last[:, None, :])[:, 0], start_b + prompt_len_b, c,
                       n_out)


def first_token(cache: KVCache | None, logits_bv: jax.Array, prompt_len_b: jax.Array,
                c: Constants, n_out: int) -> DecodeState:
    """The state after a prefill: the first token sampled from the prompts' last logits
    (prompt_len_b: positions each sequence now holds, its prompt's last at len - 1)."""
    batch = logits_bv.shape[0]
    state = DecodeState(
        cache=cache, tokens_bn=jnp.zeros((batch, n_out), jnp.int32),
        count_b=jnp.zeros((batch,), jnp.int32), last_b=jnp.zeros((batch,), jnp.int32),
        position_b=prompt_len_b - 1, done_b=jnp.zeros((batch,), bool),
        tail_bm=stops.empty_tail(batch, c.stop_spec.bytes_sm.shape[-1]),
        step=jnp.zeros((), jnp.int32))
    return _emit(state, sample(logits_bv, c.sampling, state.step), c)


def decode(model: Transformer, state: DecodeState, c: Constants, limit: jax.Array
           ) -> DecodeState:
    """Generate until every sequence is done or `limit` total steps have been taken."""

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_b)

    def body(s: DecodeState):
        x_btd, cache = model.cached(s.last_b[:, None], s.position_b[:, None], s.cache)
        token_b = sample(model.logits(x_btd)[:, 0], c.sampling, s.step)
        return _emit(s.replace(cache=cache), token_b, c)

    return jax.lax.while_loop(cond, body, state)


# ---- compiled entry points -------------------------------------------------------------
# The graph definition is static (hashable structure); parameters and the cache are
# arguments, the cache donated so each call updates it in place.

class StaticGraph:
    """A model's GraphDef as a static jit argument whose hash is computed once.

    The jit cache hashes static arguments on every call, and an NNX GraphDef recomputes its
    hash each time: about 0.7 ms for the tiny model, more than a decode step. The serving
    engine and `stream` dispatch a compiled call every few tokens, so they pass this instead.
    """

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (
            other.graphdef is self.graphdef or other.graphdef == self.graphdef)


def merge(graph, params):
    """The model from a GraphDef (or a StaticGraph holding one) and its parameters."""
    return nnx.merge(graph.graphdef if isinstance(graph, StaticGraph) else graph, params)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def generate_jit(graphdef, params, cache, prompt_bp, prompt_len_b, c: Constants, n_out: int
                 ) -> DecodeState:
    model = merge(graphdef, params)
    state = prefill(model, cache, prompt_bp, prompt_len_b, c, n_out)
    return decode(model, state, c, c.max_new)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(2,))
def continue_jit(graphdef, params, cache, prompt_bp, prompt_len_b, start_b, c: Constants,
                 n_out: int) -> DecodeState:
    """generate_jit for prompts that continue at start_b over a cache that holds the
    positions before it."""
    model = merge(graphdef, params)
    state = prefill(model, cache, prompt_bp, prompt_len_b, c, n_out, start_b)
    return decode(model, state, c, c.max_new)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def prefill_jit(graphdef, params, cache, prompt_bp, prompt_len_b, c: Constants, n_out: int
                ) -> DecodeState:
    return prefill(merge(graphdef, params), cache, prompt_bp, prompt_len_b, c, n_out)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def decode_jit(graphdef, params, state: DecodeState, c: Constants, limit: jax.Array
               ) -> DecodeState:
    return decode(merge(graphdef, params), state, c, limit)
