"""Check a plan against the model it was compiled from: logits at every position of a
prompt, the placed program's versus the model's own cached decode step.

A plan whose matrices are stored in another format than the model's parameters (`compile(
..., weights='q4_0')`) is checked against the model as that format stores it: each tiled
matrix quantized with spark_model.quant.quantize (blocks of 32 along its input axis, or
along a lookup table's rows, as in a GGUF file) and dequantized again, or rounded through a
dense dtype; the placed program and the model both run on those values (`stored_weights`,
`stored_model`). So `--verify --weights q8_0` shows that the blocked, placed program
computes the quantized model's logits.

`verify_step_diffs` checks the placed program's verify step of k rows (speculative
decoding's check of drafts) against the model's own cached forward over the same k tokens.
"""

from __future__ import annotations

from typing import Sequence

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from compiler.execute import Runner, leaves
from compiler.ir import CompilerError, Op, is_packed, weight_format_of
from spark_model.kv_cache import init_cache

DEFAULT_PROMPT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"


@nnx.jit
def model_step(model, tokens_bt, positions_bt, cache):
    """The model's own decode step: (logits (B, 1, V), cache)."""
    x_btd, cache = model.cached(tokens_bt, positions_bt, cache)
    return model.logits(x_btd), cache


def _as_nk(a: np.ndarray, op: Op) -> tuple[np.ndarray, bool]:
    """A tiled op's parameter as the (rows, blocked axis) matrix its format quantizes, and
    whether that is the parameter's layout transposed. A matvec's contracted axes lead its
    parameter (or trail it when it is used transposed, as a tied table is), as every
    Spark parameter's do; a lookup table (V, D) is blocked along D."""
    shape = a.shape
    if op.kind == "lookup":
        return a.reshape(shape[0], -1), False
    for i in range(1, len(shape)):
        if not op.transposed and int(np.prod(shape[:i])) == op.k:
            return a.reshape(op.k, op.n).T, True
        if op.transposed and int(np.prod(shape[i:])) == op.k:
            return a.reshape(op.n, op.k), False
    raise CompilerError(f"weight {op.weight} of shape {shape}: its contracted axes (K = "
                        f"{op.k}) neither lead nor trail, so its blocks cannot be found")


def stored_weights(plan, flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """`flat` ({name: array}) with every tiled matrix replaced by the values the plan's
    format stores: packed formats quantized and dequantized (spark_model.quant), dense
    ones rounded through their dtype; each returned in its own dtype and shape. Norm
    scales and biases are returned as they are."""
    from spark_model import quant

    out = {n: np.asarray(a) for n, a in flat.items()}
    for o in plan.graph.ops:
        if not o.is_tiled:
            continue
        a = out[o.weight]
        if is_packed(o.weight_dtype):
            m, transposed = _as_nk(a.astype(np.float32), o)
            d = quant.dequantize(quant.quantize(m, o.weight_dtype, name=o.weight))
            d = d.T if transposed else d
            out[o.weight] = d.reshape(a.shape).astype(a.dtype)
        else:
            out[o.weight] = np.asarray(jnp.asarray(a, o.weight_dtype).astype(a.dtype))
    return out


def stored_model(plan, model):
    """`model` (a SparkModel or Transformer) with its matrices as `plan` stores them
    (itself when the plan keeps the model's own parameter dtype)."""
    from spark_model.checkpoint import flat_params, model_from_flat

    model = getattr(model, "model", model)
    if plan.weights == weight_format_of(model.cfg):
        return model
    return model_from_flat(model.cfg, stored_weights(plan, flat_params(model)))


def logit_diffs(plan, model, prompt_ids: Sequence[int], capacity: int = 2048) -> list[float]:
    """Largest |logit difference| at each position of `prompt_ids`, fed one token at a
    time through both the plan and `model` (a SparkModel or a Transformer), both on the
    weights as the plan stores them (stored_model)."""
    if len(prompt_ids) > capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds capacity {capacity}")
    model = getattr(model, "model", model)  # a SparkModel's Transformer
    cfg = model.cfg
    if cfg != plan.cfg:
        raise ValueError("the model's config differs from the one the plan was compiled for")
    model = stored_model(plan, model)
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


def verify_step_diffs(plan, model, prompt_ids: Sequence[int], rows: int,
                      capacity: int = 2048) -> list[float]:
    """Largest |logit difference| of each verify step: `prompt_ids` fed `rows` tokens at
    a time (the last chunk may be shorter) through the placed program's k-row step and
    through the model's own cached forward on the same chunks, both on the weights as
    the plan stores them. One entry per step, over all its rows."""
    from compiler.speculate import check_rows

    rows = check_rows(rows)
    if len(prompt_ids) > capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds capacity {capacity}")
    model = getattr(model, "model", model)
    if model.cfg != plan.cfg:
        raise ValueError("the model's config differs from the one the plan was compiled for")
    model = stored_model(plan, model)
    weights = leaves(plan, model)
    run = Runner(plan)
    cache_plan, cache_model = init_cache(model.cfg, 1, capacity), init_cache(model.cfg, 1,
                                                                             capacity)
    out = []
    for start in range(0, len(prompt_ids), rows):
        chunk = [int(i) for i in prompt_ids[start:start + rows]]
        t = jnp.array([chunk], jnp.int32)
        p = jnp.arange(start, start + len(chunk), dtype=jnp.int32)[None]
        ours, cache_plan = run(weights, t, p, cache_plan)
        ref, cache_model = model_step(model, t, p, cache_model)
        out.append(float(jnp.abs(ours - ref).max()))
    return out
