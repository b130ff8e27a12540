"""An independent NumPy Llama forward, written from the published architecture.

It shares no code with spark_model: it reads the flat parameter dict and recomputes
everything in float64 with explicit loops over heads, Hugging Face's rotate-half RoPE
and repeat-kv grouping (query head n uses kv head n // G).
"""

from __future__ import annotations

import math

import numpy as np


def llama31_inv_freq(head_dim, theta, factor, low, high, original):
    """Scalar transcription of the Llama 3.1 frequency-scaling rule."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x_th, positions, inv_freq):
    # Rotate-half convention: pairs (i, i + H/2); cos/sin repeated over both halves.
    ang = np.outer(positions, inv_freq)  # (T, H/2)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)
    half = x_th.shape[-1] // 2
    rot = np.concatenate([-x_th[:, half:], x_th[:, :half]], -1)
    return x_th * cos + rot * sin


def forward(params: dict, cfg, tokens: np.ndarray) -> np.ndarray:
    """tokens (T,) -> logits (T, V), float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    sc = cfg.rope_scaling
    if sc is None or sc.kind == "linear":
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        inv_freq = inv_freq if sc is None else inv_freq / sc.factor
    else:
        inv_freq = llama31_inv_freq(cfg.head_dim, cfg.rope_theta, sc.factor,
                                    sc.low_freq_factor, sc.high_freq_factor,
                                    sc.original_max_position)
    t_len = len(tokens)
    pos = np.arange(t_len)
    x = p["embed"][tokens]  # (T, D)
    g = cfg.n_heads // cfg.n_kv_heads
    causal = np.tril(np.ones((t_len, t_len), bool))
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        h = _rms(x, p[pre + "attn_norm.scale"], cfg.norm_eps)
        heads = []
        for n in range(cfg.n_heads):
            kv = n // g
            bq, bk, bv = ((p[pre + "attn.q_bias"][n], p[pre + "attn.k_bias"][kv],
                           p[pre + "attn.v_bias"][kv]) if cfg.attn_bias else (0.0, 0.0, 0.0))
            q = _rope(h @ p[pre + "attn.q"][:, n, :] + bq, pos, inv_freq)
            k = _rope(h @ p[pre + "attn.k"][:, kv, :] + bk, pos, inv_freq)
            v = h @ p[pre + "attn.v"][:, kv, :] + bv
            s = q @ k.T / math.sqrt(cfg.head_dim)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v @ p[pre + "attn.o"][n])
        x = x + sum(heads)
        h = _rms(x, p[pre + "mlp_norm.scale"], cfg.norm_eps)
        gate = h @ p[pre + "mlp.gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p[pre + "mlp.up"])) @ p[pre + "mlp.down"]
    x = _rms(x, p["final_norm.scale"], cfg.norm_eps)
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])
