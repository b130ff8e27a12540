"""Check a plan against the model it was compiled from: logits at every position of a
prompt, the placed program's versus the model's own cached decode step."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from compiler.execute import Runner, leaves
from spark_model.kv_cache import init_cache

DEFAULT_PROMPT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"


@nnx.jit
def model_step(model, tokens_bt, positions_bt, cache):
    """The model's own decode step: (logits (B, 1, V), cache)."""
    x_btd, cache = model.cached(tokens_bt, positions_bt, cache)
    return model.logits(x_btd), cache


def logit_diffs(plan, model, prompt_ids: Sequence[int], capacity: int = 2048) -> list[float]:
    """Largest |logit difference| at each position of `prompt_ids`, fed one token at a
    time through both the plan and `model` (a SparkModel or a Transformer)."""
    if len(prompt_ids) > capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds capacity {capacity}")
    model = getattr(model, "model", model)  # a SparkModel's Transformer
    cfg = model.cfg
    if cfg != plan.cfg:
        raise ValueError("the model's config differs from the one the plan was compiled for")
    weights = leaves(plan, model)
    run = Runner(plan)
    cache_plan, cache_model = init_cache(cfg, 1, capacity), init_cache(cfg, 1, capacity)
    out = []
    for pos, tok in enumerate(prompt_ids):
        t, p = jnp.array([[tok]], jnp.int32), jnp.array([[pos]], jnp.int32)
        ours, cache_plan = run(weights, t, p, cache_plan)
        ref, cache_model = model_step(model, t, p, cache_model)
        out.append(float(jnp.abs(ours - ref).max()))
    return out
