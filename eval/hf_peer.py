"""The Hugging Face peer: the same weights as a transformers `LlamaForCausalLM`.

Used by `spark bench decode` to time transformers' `generate()` on identical weights, and by
the tests as an independent implementation of the architecture. Needs the optional extra
`pip install -e '.[bench]'` (torch, transformers).
"""

from __future__ import annotations

import time

import numpy as np

from spark_model.checkpoint import flat_params
from spark_model.transformer import Transformer


def available() -> str | None:
    """None when the peer can run, else the reason it cannot."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[bench]')"
    return None


def to_hf(model: Transformer):
    """A float32 LlamaForCausalLM holding exactly `model`'s weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    sc = cfg.rope_scaling
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        rope_scaling=None if sc is None else {
            "rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
            "high_freq_factor": sc.high_freq_factor,
            "original_max_position_embeddings": sc.original_max_position},
        attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="float32",
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    p = {k: np.asarray(v, np.float32) for k, v in flat_params(model).items()}
    d, nh, kh = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # Ours are (in, out) einsum weights; torch Linear stores (out, in).
    sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm.scale"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"].T
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        sd[dst + "self_attn.q_proj.weight"] = p[src + "attn.q"].reshape(d, nh).T
        sd[dst + "self_attn.k_proj.weight"] = p[src + "attn.k"].reshape(d, kh).T
        sd[dst + "self_attn.v_proj.weight"] = p[src + "attn.v"].reshape(d, kh).T
        sd[dst + "self_attn.o_proj.weight"] = p[src + "attn.o"].reshape(nh, d).T
        sd[dst + "mlp.gate_proj.weight"] = p[src + "mlp.gate"].T
        sd[dst + "mlp.up_proj.weight"] = p[src + "mlp.up"].T
        sd[dst + "mlp.down_proj.weight"] = p[src + "mlp.down"].T
        sd[dst + "input_layernorm.weight"] = p[src + "attn_norm.scale"]
        sd[dst + "post_attention_layernorm.weight"] = p[src + "mlp_norm.scale"]
    hf = LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf


def logits(hf, tokens_bt: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long)).logits.numpy()


def time_generate(hf, prompt_ids: list[int], new_tokens: int, runs: int = 3) -> dict:
    """Greedy generate() of exactly `new_tokens` tokens: best-of-runs tokens/s and the ids."""
    import torch

    x = torch.as_tensor([prompt_ids], dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(x), pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(x, **kw)  # warm-up
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            out = hf.generate(x, **kw)
            best = min(best, time.perf_counter() - t0)
    return {"tokens_per_s": new_tokens / best, "seconds": best,
            "ids": out[0, len(prompt_ids):].tolist()}
