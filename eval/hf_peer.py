"""The Hugging Face peer: the same weights as a transformers Llama (or Qwen2) model.

Used by `spark bench decode` to time transformers' `generate()` on identical weights, and by
the tests as an independent implementation of the architecture. Needs the optional extra
`pip install -e '.[bench]'` (torch, transformers).
"""

from __future__ import annotations

import time

import numpy as np

from spark_model.checkpoint import flat_params
from spark_model.formats.hf_write import hf_config, hf_tensors
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
    """A float32 transformers model holding exactly `model`'s weights.

    LlamaForCausalLM, or Qwen2ForCausalLM when the model has q/k/v biases (attn_bias);
    Llama 3.1 and linear RoPE scaling both carry over (formats/hf_write.py's config.json).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.cfg
    hf_cfg = AutoConfig.for_model(**hf_config(cfg, "float32"), pad_token_id=None)
    sd = hf_tensors(cfg, flat_params(model))
    hf = AutoModelForCausalLM.from_config(hf_cfg).to(torch.float32).eval()
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
