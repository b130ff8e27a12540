"""Writing a Spark model as a Hugging Face directory (config.json + model.safetensors).

The inverse of formats/hf.py: a model without q/k/v biases is written as a
`LlamaForCausalLM`, one with them as a `Qwen2ForCausalLM` (Llama's attention_bias would
also demand an output-projection bias, which Spark does not have). transformers loads the
result as it is, and `read_hf` reads it back to the same parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spark_model.config import ModelConfig
from spark_model.formats.hf import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES
from spark_model.formats.safetensors_file import write_safetensors

_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def hf_tensors(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Spark flat parameters -> Hugging Face-named (out, in) float32 arrays (mapping's inverse)."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    d, nh, kh = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": p["embed"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = p[src + "attn_norm.scale"]
        out[dst + "post_attention_layernorm.weight"] = p[src + "mlp_norm.scale"]
        out[dst + "self_attn.q_proj.weight"] = p[src + "attn.q"].reshape(d, nh).T
        out[dst + "self_attn.k_proj.weight"] = p[src + "attn.k"].reshape(d, kh).T
        out[dst + "self_attn.v_proj.weight"] = p[src + "attn.v"].reshape(d, kh).T
        out[dst + "self_attn.o_proj.weight"] = p[src + "attn.o"].reshape(nh, d).T
        if cfg.attn_bias:
            out[dst + "self_attn.q_proj.bias"] = p[src + "attn.q_bias"].reshape(nh)
            out[dst + "self_attn.k_proj.bias"] = p[src + "attn.k_bias"].reshape(kh)
            out[dst + "self_attn.v_proj.bias"] = p[src + "attn.v_bias"].reshape(kh)
        for part in ("gate", "up", "down"):
            out[dst + f"mlp.{part}_proj.weight"] = p[src + f"mlp.{part}"].T
    out["model.norm.weight"] = p["final_norm.scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json object transformers (4.x and 5.x) reads as exactly `cfg`'s model."""
    arch, model_type = (("Qwen2ForCausalLM", "qwen2") if cfg.attn_bias
                        else ("LlamaForCausalLM", "llama"))
    sc = cfg.rope_scaling
    if sc is None:
        scaling = None
    elif sc.kind == "linear":
        scaling = {"rope_type": "linear", "factor": sc.factor}
    else:
        scaling = {"rope_type": "llama3", "factor": sc.factor,
                   "low_freq_factor": sc.low_freq_factor,
                   "high_freq_factor": sc.high_freq_factor,
                   "original_max_position_embeddings": sc.original_max_position}
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
           "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
           "torch_dtype": dtype, "bos_token_id": None, "eos_token_id": None}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def write_hf(directory: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any],
             tokenizer: str | os.PathLike | None = None, *, dtype: str = "float32") -> Path:
    """Write `params` of `cfg` as a Hugging Face directory; returns its path.

    tokenizer: a directory whose Hugging Face tokenizer files (tokenizer.json,
    tokenizer_config.json, ...) are copied alongside, or None. dtype: "float32" (exact),
    "bfloat16" or "float16" (rounded to nearest). The directory is created if needed;
    existing model files in it are never overwritten (FileExistsError).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    root = Path(directory)
    copies = []
    if tokenizer is not None:
        src = Path(tokenizer)
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: tokenizer source must be a directory")
        copies = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not copies:
            raise FileNotFoundError(f"{src}: holds none of {', '.join(TOKENIZER_FILES)}")
    clash = [n for n in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *(c.name for c in copies))
             if (root / n).exists()]
    if clash:
        raise FileExistsError(f"{root}: already holds {', '.join(clash)}; not overwriting")
    tensors = hf_tensors(cfg, params)  # Fails on a missing parameter before writing anything.
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(root / SINGLE_FILE, tensors, _DTYPES[dtype], metadata={"format": "pt"})
    fd, tmp = tempfile.mkstemp(prefix=CONFIG_FILE + ".", suffix=".partial", dir=root)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2, sort_keys=True)
    os.replace(tmp, root / CONFIG_FILE)
    for c in copies:
        shutil.copyfile(c, root / c.name)
    return root
