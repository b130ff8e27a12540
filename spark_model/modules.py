"""Decoder block: grouped-query attention with RoPE, SwiGLU MLP, pre-norm residuals.

Axis letters (see config.ModelConfig): B batch, T query positions, S key positions,
D width, N query heads, K kv heads, G query heads per kv head, H head dim, F ff width.

The attention *projections* live here; the attention *kernel* is a function passed in
(`attend`), so the full causal forward and the KV-cached decode step run the very same
layer code and differ only in how queries meet keys.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from spark_model import rotary
from spark_model.config import ModelConfig
from spark_model.layers import (RMSNorm, as_weight, linear_many, rope_frequencies, rotate,
                                rows_linear)

# attend(q_btnh, k_btkh, v_btkh) -> (o_btnh, aux): aux carries e.g. an updated cache.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def _param(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(key, shape, dtype) * std)


def causal_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array
                     ) -> tuple[jax.Array, None]:
    """Plain masked softmax attention over one whole sequence (query i sees keys <= i)."""
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    mask_ts = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    return masked_attention(q_btnh, k_bskh, v_bskh, mask_ts), None


def masked_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                     mask_ts: jax.Array) -> jax.Array:
    """Softmax attention where query t sees key s iff mask_ts[t, s] (each row needs one)."""
    n_kv = k_bskh.shape[2]
    q = rearrange(q_btnh, "b t (k g) h -> b t k g h", k=n_kv)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_ts, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return rearrange(o, "b t k g h -> b t (k g) h")


class Attention(nnx.Module):
    """Grouped-query attention projections: q (D,N,H), k and v (D,K,H), o (N,H,D); with
    cfg.attn_bias also q_bias (N,H), k_bias and v_bias (K,H) (Qwen2)."""

    def __init__(self, cfg: ModelConfig, *, key: jax.Array):
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # residual-branch scaling
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q = _param(kq, (cfg.d_model, cfg.n_heads, cfg.head_dim), cfg.init_std, pd)
        self.k = _param(kk, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), cfg.init_std, pd)
        self.v = _param(kv, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), cfg.init_std, pd)
        self.o = _param(ko, (cfg.n_heads, cfg.head_dim, cfg.d_model), out_std, pd)
        if cfg.attn_bias:
            self.q_bias = nnx.Param(jnp.zeros((cfg.n_heads, cfg.head_dim), pd))
            self.k_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), pd))
            self.v_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), pd))
        self.bias = cfg.attn_bias
        # Rotary frequencies are constants of the config, rebuilt at trace time.
        self.rope = (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.dtype = jnp.dtype(cfg.dtype)

    def project_qkv(self, x_btd: jax.Array, positions_bt: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = self.dtype
        # Plain 2-D products, (B*T, D) x (D, heads*H): the form XLA:CPU runs fastest, and
        # one native call for all three in a decode step (reads x once, one thread hand-off).
        # A packed weight is already (heads*H, D): see spark_model/packing.py.
        x = rearrange(x_btd, "b t d -> (b t) d")
        ys = linear_many(x, [as_weight(p, dt, "d n h -> d (n h)")
                             for p in (self.q, self.k, self.v)])
        q, k, v = (rearrange(y, "(b t) (n h) -> b t n h", b=x_btd.shape[0], h=self.rope[0])
                   for y in ys)
        if self.bias:
            q, k, v = (y + b[...].astype(dt) for y, b in
                       zip((q, k, v), (self.q_bias, self.k_bias, self.v_bias)))
        freqs = rope_frequencies(*self.rope)
        sin, cos = rotary.sin_cos(positions_bt, freqs)  # once for queries and keys
        return rotate(q, sin, cos), rotate(k, sin, cos), v

    def project_out(self, o_btnh: jax.Array) -> jax.Array:
        # Flatten (N, H) on both sides first: contracting two axes at once made XLA copy
        # the whole o weight into a new layout on every decode step.
        # A packed o is (D, N*H).
        w_nh_d = as_weight(self.o, self.dtype, "n h d -> (n h) d")
        return rows_linear(rearrange(o_btnh, "b t n h -> b t (n h)"), w_nh_d)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, key: jax.Array):
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        kg, ku, kd = jax.random.split(key, 3)
        self.gate = _param(kg, (cfg.d_model, cfg.d_ff), cfg.init_std, pd)
        self.up = _param(ku, (cfg.d_model, cfg.d_ff), cfg.init_std, pd)
        self.down = _param(kd, (cfg.d_ff, cfg.d_model), out_std, pd)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        x = rearrange(x_btd, "b t d -> (b t) d")
        g, u = linear_many(x, [as_weight(self.gate, dt), as_weight(self.up, dt)])
        h = rearrange(jax.nn.silu(g) * u, "(b t) f -> b t f", b=x_btd.shape[0])
        return rows_linear(h, as_weight(self.down, dt))


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, key: jax.Array):
        pd = jnp.dtype(cfg.param_dtype)
        k_attn, k_mlp = jax.random.split(key)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(cfg, key=k_attn)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, key=k_mlp)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array,
                 attend: AttendFn = causal_attention) -> tuple[jax.Array, Any]:
        q, k, v = self.attn.project_qkv(self.attn_norm(x_btd), positions_bt)
        o, aux = attend(q, k, v)
        x_btd = x_btd + self.attn.project_out(o)
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return x_btd, aux
