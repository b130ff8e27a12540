"""Next-token choice inside the compiled loop: greedy, temperature, top-k and top-p.

Every setting is a traced (B,) array, so changing it never recompiles, and each sequence
of a batch can use its own. Randomness comes from a per-sequence seed folded with the
step number: the same seed gives the same tokens, whatever else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from spark_model import kernels


@struct.dataclass
class SamplingParams:
    """Per-sequence settings, each of shape (B,)."""

    temperature: jax.Array  # f32; 0 means greedy (argmax)
    top_k: jax.Array  # int32; 0 means no top-k cut
    top_p: jax.Array  # f32 in (0, 1]; 1 means no nucleus cut
    seed: jax.Array  # uint32; the sequence's random stream

    @classmethod
    def make(cls, batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seeds=None) -> "SamplingParams":
        seeds = jnp.arange(batch, dtype=jnp.uint32) if seeds is None else seeds
        return cls(temperature=jnp.full((batch,), temperature, jnp.float32),
                   top_k=jnp.full((batch,), top_k, jnp.int32),
                   top_p=jnp.full((batch,), top_p, jnp.float32),
                   seed=jnp.asarray(seeds, jnp.uint32))


def argmax(logits_bv: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first maximum; first NaN if any), as int32.

    The native kernel on CPU for 2-D f32 logits. Otherwise a max and a min: XLA:CPU runs
    jnp.argmax's (value, index) reduction at about 25 us over 8K logits, these two plain
    reductions at about 5 (and about 100 us over 8 rows, which the kernel does in a few).
    """
    if logits_bv.ndim == 2 and kernels.usable(logits_bv):
        return kernels.argmax(logits_bv)
    # A NaN is looked for on its own: XLA's max need not return one it has seen (it did
    # not for a NaN with the sign bit set).
    nan = jnp.isnan(logits_bv)
    top = jnp.max(jnp.where(nan, -jnp.inf, logits_bv), axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits_bv == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits_bv.shape[-1]), axis=-1)


def _plain_row(logits_v, temperature, seed, step):
    """Temperature sampling over the whole vocabulary: no sort needed."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.categorical(key, logits_v / jnp.maximum(temperature, 1e-6))


def _kept_sorted(logits_v, temperature, top_k, top_p):
    """The scaled logits sorted descending, their ids, and which of them top-k and top-p
    keep (the first always)."""
    vocab = logits_v.shape[-1]
    scaled = logits_v / jnp.maximum(temperature, 1e-6)
    vals, idx = jax.lax.top_k(scaled, vocab)  # sorted, descending
    keep = (top_k <= 0) | (jnp.arange(vocab) < top_k)
    vals = jnp.where(keep, vals, -jnp.inf)
    probs = jax.nn.softmax(vals)
    # Nucleus: keep a token while the mass before it is below top_p (the first always).
    keep &= (jnp.cumsum(probs) - probs) < top_p
    return vals, idx, keep


def _sample_row(logits_v, temperature, top_k, top_p, seed, step):
    vals, idx, keep = _kept_sorted(logits_v, temperature, top_k, top_p)
    key = jax.random.fold_in(jax.random.key(seed), step)
    choice = jax.random.categorical(key, jnp.where(keep, vals, -jnp.inf))
    return idx[choice]


def _log_weights_row(logits_v, temperature, top_k, top_p):
    vals, idx, keep = _kept_sorted(logits_v, temperature, top_k, top_p)
    kept = jnp.full(logits_v.shape, -jnp.inf, vals.dtype).at[idx].set(
        jnp.where(keep, vals, -jnp.inf))
    return jax.nn.log_softmax(kept)


def log_weights(logits_nv: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """log P(token) (N, V) of the distribution `sample` draws from for each row at
    temperature > 0 (-inf for the tokens top-k or top-p cut); every setting is (N,).
    The speculative-sampling acceptance rule (`spark_model.speculative`) reads it."""
    def truncated(_):
        return jax.vmap(_log_weights_row)(logits_nv, temperature, top_k, top_p)

    def plain(_):
        return jax.nn.log_softmax(logits_nv / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)

    cut = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
    return jax.lax.cond(cut, truncated, plain, None)


def sample(logits_bv: jax.Array, params: SamplingParams, step: jax.Array) -> jax.Array:
    """Token ids (B,) for logits (B, V) at generation step `step`.

    `step` is one number for the whole batch, or (B,) when rows are at different steps of
    their own generations (the serving engine's slots): a row's draw depends only on its
    seed and its own step, so it is the same whether it runs alone or beside others.
    """
    greedy = argmax(logits_bv)
    step_b = jnp.broadcast_to(step, greedy.shape)

    def truncated(_):
        return jax.vmap(_sample_row)(
            logits_bv, params.temperature, params.top_k, params.top_p, params.seed, step_b)

    def plain(_):
        return jax.vmap(_plain_row)(logits_bv, params.temperature, params.seed, step_b)

    def stochastic(_):
        # Sorting the vocabulary (for top-k / top-p) costs more than the rest of a step on
        # CPU, so it runs only when some row asks for a cut.
        cut = jnp.any(params.top_k > 0) | jnp.any(params.top_p < 1.0)
        drawn = jax.lax.cond(cut, truncated, plain, None)
        return jnp.where(params.temperature > 0, drawn.astype(jnp.int32), greedy)

    # An all-greedy batch skips sampling entirely.
    return jax.lax.cond(jnp.any(params.temperature > 0), stochastic, lambda _: greedy, None)
