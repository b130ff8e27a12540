"""The cost model in the settings WaferLLM measured on a WSE-2, for calibration.

WaferLLM (OSDI'25) reports, on WSE-2:
  - a [1,16K] x [16K,16K] fp16 GEMV (MeshGEMV) in 0.0012 ms (Table 6). The grid is not
    stated; its script needs P to divide the matrix size and the fabric is 757 x 996, so we
    take P = 512, the largest power of two that fits (an assumption).
  - LLaMA3-8B decoding at 2,699.9 tokens/s per request at 4K context on 420 x 420 cores
    (Table 4). Its code maps one decoder layer over the P x P grid, times it and multiplies
    by the layer count, with no embedding or output projection; every matrix is spread over
    all P x P cores and reductions alternate between the grid's axes, so no hand-off moves
    data between regions.

`gemv_seconds` and `waferllm_decode` price those settings with the same functions that
price a plan (cost.matvec, cost.attention, cost.vector); nothing is fitted to them.
"""

from __future__ import annotations

import numpy as np

from compiler import cost, frontend
from compiler.partition import Tiling
from compiler.target import Target, get_target
from spark_model.config import ModelConfig

GEMV_16K_SECONDS = 0.0012e-3  # WaferLLM Table 6, WSE-2
GEMV_GRID = 512  # assumed, see above
LLAMA3_8B_TOKENS_PER_S = 2699.9  # WaferLLM Table 4, WSE-2, 420 x 420 cores, 4K context
DECODE_GRID = 420
DECODE_CONTEXT = 4096


def gemv_seconds(k: int = 16_384, n: int = 16_384, grid: int = GEMV_GRID,
                 target: Target | str = "wse2", act_bytes: int = 2) -> float:
    """Predicted MeshGEMV time of a [1,k] x [k,n] fp16 product over grid x grid cores."""
    t = get_target(target)
    tl = Tiling(pr=min(grid, k), pc=min(grid, n), k=k, n=n, wbytes=2)
    return cost.matvec(tl, act_bytes, t, replicated=True).total / t.clock_hz


def waferllm_decode(cfg: ModelConfig | str = "llama3-8b", target: Target | str = "wse2",
                    grid: int = DECODE_GRID, context: int = DECODE_CONTEXT) -> dict:
    """Predicted decode speed with every op of a layer over grid x grid cores, layers one
    after another (one layer's critical path x the layer count)."""
    cfg = ModelConfig.preset(cfg) if isinstance(cfg, str) else cfg
    t = get_target(target)
    act = np.dtype(cfg.dtype).itemsize
    g = frontend.build_graph(cfg.replace(n_layers=1))
    layer = [o for o in g.ops if o.layer == 0]
    full = Tiling(pr=grid, pc=grid)
    # Critical path of one layer: q, k and v run together (their costs are equal or
    # smaller than q's), as do gate and up.
    path = cost.Cost()
    for o in layer:
        if o.name.endswith((".k", ".v", ".up")):  # in parallel with .q / .gate
            continue
        if o.kind == "matvec":
            tl = Tiling(pr=min(grid, o.k), pc=min(grid, o.n), k=o.k, n=o.n, wbytes=2)
            path = path + cost.matvec(tl, act, t, replicated=True)
        elif o.kind == "attention":
            n_kv = o.heads[1]
            cols = max(grid // n_kv, 1)  # each kv head over its own columns
            path = path + cost.attention(o, Tiling(pr=grid, pc=cols * n_kv), context, act, t)
        else:
            path = path + cost.vector(o, full, act, t)
    seconds = path.total * cfg.n_layers / t.clock_hz
    return {"tokens_per_s": 1.0 / seconds, "seconds_per_token": seconds,
            "layer": path.seconds(t)}
