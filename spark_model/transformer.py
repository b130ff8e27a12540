"""The Llama-family decoder: embedding, a stack of blocks, final norm, output projection."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spark_model import kv_cache, quant
from spark_model.config import ModelConfig
from spark_model.kv_cache import KVCache
from spark_model.layers import RMSNorm, as_weight, rows_linear
from spark_model.modules import AttendFn, Block, causal_attention


class Transformer(nnx.Module):
    """Token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        # One draw from the stream, split locally: every draw from nnx.Rngs updates its
        # state, which made abstract construction of the 80-layer preset take seconds.
        k_embed, k_head, *k_blocks = jax.random.split(rngs.params(), cfg.n_layers + 2)
        # The embedding is (V, D); the tied output projection reads it as (D, V).
        self.embed = nnx.Param(
            jax.random.normal(k_embed, (cfg.vocab_size, cfg.d_model), pd) * cfg.init_std)
        self.blocks = nnx.List([Block(cfg, key=k) for k in k_blocks])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(
                jax.random.normal(k_head, (cfg.d_model, cfg.vocab_size), pd) * cfg.init_std)

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        table = self.embed.get_value()
        if isinstance(table, quant.PackedWeight):  # gather the rows, expand only those
            x = quant.dequantize_jnp(quant.take_rows(table, tokens_bt.reshape(-1)))
            return x.reshape(*tokens_bt.shape, x.shape[-1]).astype(dt)
        return jnp.take(table, tokens_bt, axis=0).astype(dt)

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """Final norm and output projection; logits are always f32."""
        x_btd = self.final_norm(x_btd)
        if self.cfg.tie_embeddings:  # (V, D): the embedding table, used transposed
            w_vd = as_weight(self.embed, x_btd.dtype)
            return rows_linear(x_btd, w_vd, transposed=True, preferred_element_type=jnp.float32)
        # A packed lm_head is (V, D).
        return rows_linear(x_btd, as_weight(self.lm_head, x_btd.dtype),
                           preferred_element_type=jnp.float32)

    def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array,
               attends: Sequence[AttendFn]) -> tuple[jax.Array, list[Any]]:
        """Run every block with its own attention kernel: residual stream (B, T, D) and aux."""
        x = self.embed_tokens(tokens_bt)
        auxes = []
        for block, attend in zip(self.blocks, attends, strict=True):
            x, aux = block(x, positions_bt, attend)
            auxes.append(aux)
        return x, auxes

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None
                 ) -> jax.Array:
        """Full causal forward over whole sequences (training, scoring, references)."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x, _ = self.hidden(tokens_bt, positions_bt, [causal_attention] * self.cfg.n_layers)
        return self.logits(x)

    def cached(self, tokens_bt: jax.Array, positions_bt: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        """The same blocks over a KV cache: tokens at consecutive positions per sequence.

        Writes their keys and values at positions_bt[:, 0] onwards, attends over cache
        entries at positions <= each query's, and returns the residual stream (B, T, D)
        (apply `logits` to the rows needed) and the updated cache.
        """
        def attend_layer(layer: int) -> AttendFn:
            def attend(q, k, v):
                o, k_cache, v_cache = kv_cache.attend(q, k, v, cache.k[layer], cache.v[layer],
                                                      positions_bt)
                return o, (k_cache, v_cache)
            return attend

        x, kvs = self.hidden(tokens_bt, positions_bt,
                             [attend_layer(i) for i in range(self.cfg.n_layers)])
        return x, KVCache(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs))


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model (initialisers run as one compiled program)."""
    return _init_jit(cfg, jax.random.key(seed))


@nnx.jit(static_argnums=0)
def _init_jit(cfg: ModelConfig, key: jax.Array) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with ShapeDtypeStructs instead of arrays (allocates nothing)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, computed from shapes alone (instant for 70B)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


@nnx.jit
def full_logits(model: Transformer, tokens_bt: jax.Array) -> jax.Array:
    """The full causal forward compiled once per (model structure, shape)."""
    return model(tokens_bt)
