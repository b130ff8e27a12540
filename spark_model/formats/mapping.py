"""Hugging Face Llama-family tensor names and layouts -> Spark parameters.

Hugging Face stores every projection as a torch Linear weight, (out, in); Spark keeps
(in, out) einsum weights with the head axes split out: q (D, N, H), k and v (D, K, H),
o (N, H, D). Both use the rotate-half RoPE pairing, so no row permutation happens here
(GGUF's permuted q/k rows are undone by the GGUF reader before it gets here).

A matrix may arrive packed (`quant.PackedWeight`, from a GGUF file's Q8_0/Q4_0/Q4_1 blocks):
packed weights keep the (out, in) orientation for every matrix (spark_model/packing.py), so
it passes through under its Spark name unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from spark_model.config import ModelConfig
from spark_model.quant import PackedWeight


class FormatError(ValueError):
    """A model file or directory that cannot be imported; the message names the problem."""


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of `cfg` holds (in reading order)."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        names += [pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"]
        names += [pre + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if cfg.attn_bias:
            names += [pre + f"self_attn.{p}_proj.bias" for p in "qkv"]
        names += [pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> (out, in) shape, for checking a source before reading it."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    nh, kh = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (nh, d), "self_attn.k_proj.weight": (kh, d),
                 "self_attn.v_proj.weight": (kh, d), "self_attn.o_proj.weight": (d, nh),
                 "self_attn.q_proj.bias": (nh,), "self_attn.k_proj.bias": (kh,),
                 "self_attn.v_proj.bias": (kh,),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                 "mlp.down_proj.weight": (d, f)}
    out = {}
    for name in hf_names(cfg):
        if name.startswith("model.layers."):
            out[name] = per_layer[name.split(".", 3)[3]]
        else:
            out[name] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
                         "lm_head.weight": (v, d)}[name]
    return out


def check_tensors(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise FormatError naming the first missing, unexpected or misshapen tensor."""
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise FormatError(f"{source}: tensor {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise FormatError(f"{source}: unexpected tensor {extra[0]} for this architecture")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise FormatError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, "
                              f"the config needs {shape}")


def spark_params(cfg: ModelConfig, hf: Mapping[str, np.ndarray | PackedWeight]
                 ) -> dict[str, np.ndarray | PackedWeight]:
    """Hugging Face-named (out, in) arrays -> Spark's flat parameters (float32 copies;
    packed matrices as they are)."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def get(name: str) -> np.ndarray:
        return np.asarray(hf[name], np.float32)

    def mat(name: str, layout) -> np.ndarray | PackedWeight:
        w = hf[name]
        if isinstance(w, PackedWeight):
            return w
        return np.ascontiguousarray(layout(np.asarray(w, np.float32)))

    p = {"embed": mat("model.embed_tokens.weight", lambda w: w),
         "final_norm.scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        p["lm_head"] = mat("lm_head.weight", lambda w: w.T)
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        p[dst + "attn_norm.scale"] = get(src + "input_layernorm.weight")
        p[dst + "mlp_norm.scale"] = get(src + "post_attention_layernorm.weight")
        p[dst + "attn.q"] = mat(src + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h))
        p[dst + "attn.k"] = mat(src + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h))
        p[dst + "attn.v"] = mat(src + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h))
        p[dst + "attn.o"] = mat(src + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d))
        if cfg.attn_bias:
            p[dst + "attn.q_bias"] = get(src + "self_attn.q_proj.bias").reshape(n, h)
            p[dst + "attn.k_bias"] = get(src + "self_attn.k_proj.bias").reshape(k, h)
            p[dst + "attn.v_bias"] = get(src + "self_attn.v_proj.bias").reshape(k, h)
        for part in ("gate", "up", "down"):
            p[dst + f"mlp.{part}"] = mat(src + f"mlp.{part}_proj.weight", lambda w: w.T)
    return p
