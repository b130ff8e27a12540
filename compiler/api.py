"""`compile`: model (preset, config, checkpoint or loaded model) + target -> Plan.

The passes in order: frontend (trace), planner (partition, place and price each mapping),
place.refine, route, cost (predictions), check (the plan's invariants).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from compiler import cost, frontend, planner
from compiler.check import check_plan
from compiler.ir import WEIGHT_FORMATS, CompilerError, Graph, weight_format_of
from compiler.partition import tile_op
from compiler.place import NoFit, flows, hosts, overlay_max_context, pack, pack_overlay, refine
from compiler.plan import Plan
from compiler.route import route_plan
from compiler.target import Target, get_target
from spark_model.config import PRESETS, ModelConfig

DEFAULT_CONTEXT = 131_072  # 128K, or the model's own max_seq_len when that is shorter
MAX_CONTEXT_SEARCH = 1 << 26  # stop the largest-context search here (64M positions)


def resolve_model(model: Any) -> tuple[ModelConfig, str]:
    """A ModelConfig and a display name from a preset name, checkpoint directory,
    ModelConfig, Transformer or SparkModel."""
    if isinstance(model, ModelConfig):
        return model, "config"
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if name in PRESETS:
            return ModelConfig.preset(name), name
        path = Path(name)
        if path.is_dir():
            from spark_model.checkpoint import load_config

            return load_config(path), str(path)
        raise CompilerError(f"{name!r} is neither a preset ({sorted(PRESETS)}) nor a "
                            "checkpoint directory")
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        return cfg, str(getattr(model, "path", None) or "model")
    raise CompilerError(f"cannot compile a {type(model).__name__}; pass a preset name, a "
                        "checkpoint directory, a ModelConfig or a loaded model")


def bytes_needed(g: Graph, target: Target, context: int) -> int:
    """Weights (with padding at the tallest band), KV cache and buffers, in bytes."""
    total = 0
    for o in g.ops:
        if o.is_tiled or o.kind == "attention":
            t = tile_op(o, target.rows, target.core_budget, context)
            fallback = o.weight_bytes + o.kv_bytes_per_token * context
            total += t.cores * t.bytes_per_core if t else fallback
    return total


def _no_fit(g: Graph, target: Target, context: int, allowed: int, needed: int,
            fits: int) -> NoFit:
    need = bytes_needed(g, target, context)
    have = allowed * target.wafer_bytes
    gib = 1024 ** 3
    msg = (f"the model needs about {need:,} bytes ({need / gib:.2f} GiB: weights, KV cache "
           f"for {context:,} positions and buffers) and {needed} wafer(s) of {target.name}, "
           f"but {allowed} wafer(s) are allowed, which hold {have:,} bytes "
           f"({have / gib:.2f} GiB) after the per-core reserve")
    if fits:
        msg += f"; the largest context that fits on {allowed} is {fits:,}"
    return NoFit(msg + "; allow more wafers (--wafers) or a shorter context (--context)")


def _largest_context(g: Graph, target: Target, band: int, wafers: int, lo: int,
                     share: int = 1) -> int:
    """Largest context packable at (band, share) on `wafers` wafers, given `lo` fits."""
    def fits(c):
        p = pack_overlay(g, target, c) if share == 0 else pack(g, target, band, c, share)
        return p is not None and len(p.wafer_layers) <= wafers

    hi = max(lo, 1)
    while hi < MAX_CONTEXT_SEARCH and fits(hi * 2):
        hi *= 2
    if hi >= MAX_CONTEXT_SEARCH:
        return MAX_CONTEXT_SEARCH
    lo, hi = (hi, hi * 2) if fits(hi) else (0, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def compile(model: Any = "tiny", target: str | Target = "wse3", context: int | None = None, *,
            wafers: int | None = None, seed: int = 0, refine_moves: int = 100,
            layers_per_region: int | None = None, weights: str | None = None) -> Plan:
    """Trace the decode step of `model`, plan its partition, place it on `target`, refine
    the placement, route it, predict its latency and check the plan (check_plan).

    context: KV cache positions to reserve (default: the model's max_seq_len, at most
    DEFAULT_CONTEXT = 128K; SmolLM2's is 8,192). wafers: how many wafers may be
    used (default: the target's count, 1 for the presets); a model that needs more is an
    error that gives the bytes needed and available. layers_per_region: keep only the
    planner's mappings with that many layers per set of regions (0: every op over the
    whole wafer); default: the fastest of all. weights: how the matrices are stored on
    the cores, one of ir.WEIGHT_FORMATS ('f32', 'bf16', or the packed 'q8_0', 'q4_0',
    'q4_1', which tiles hold as whole 32-weight blocks with their scales); default: the
    model's parameter dtype. Norm scales and biases keep the parameter dtype.
    """
    t0 = time.perf_counter()
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise CompilerError(f"unknown weight format {weights!r} (expected one of "
                            f"{', '.join(WEIGHT_FORMATS)})")
    cfg, source = resolve_model(model)
    tgt = get_target(target, wafers=wafers)
    if context is None:
        context = min(DEFAULT_CONTEXT, cfg.max_seq_len)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise CompilerError(f"context must be a positive integer, got {context!r}")
    if context > cfg.max_seq_len:
        raise CompilerError(f"context {context:,} exceeds the model's {cfg.max_seq_len:,} "
                            "positions")
    if not isinstance(refine_moves, int) or refine_moves < 0:
        raise CompilerError(f"refine_moves must be a non-negative integer, got {refine_moves!r}")
    if layers_per_region is not None and (
            isinstance(layers_per_region, bool) or not isinstance(layers_per_region, int)
            or not 0 <= layers_per_region <= cfg.n_layers):
        raise CompilerError(f"layers_per_region must be an integer in [0, {cfg.n_layers}], "
                            f"got {layers_per_region!r}")
    g = frontend.build_graph(cfg, weights=weights)
    cands = planner.candidates(g, tgt, context, tgt.wafers, cfg, layers_per_region)
    if not cands:
        smallest = planner.smallest(g, tgt, context)
        if smallest is None:
            raise CompilerError(
                f"a layer of {source} (or one of its ops) does not fit on one {tgt.name} "
                f"wafer at context {context:,} (needs about "
                f"{bytes_needed(g, tgt, context):,} bytes in all); try a shorter context")
        share, band, needed = smallest
        fits = _largest_context(g, tgt, band, tgt.wafers, 0, share)
        raise _no_fit(g, tgt, context, tgt.wafers, needed, fits)
    best = cands[0]
    host = hosts(g)
    regions, before, after = refine(best.packing.regions,
                                    flows(g, host, best.packing.regions), seed=seed,
                                    moves_per_region=refine_moves)
    if best.share == 0:
        max_ctx = min(overlay_max_context(best.packing, tgt), MAX_CONTEXT_SEARCH)
    else:
        max_ctx = _largest_context(g, tgt, best.band, best.wafers, context, best.share)
    plan = Plan(cfg=cfg, target=tgt, context=context, graph=g, regions=regions, host=host,
                band=best.band, wafer_layers=best.packing.wafer_layers,
                placement_cost=(before, after), max_context=max_ctx, source=source,
                share=best.share, alternatives=[c.describe() for c in cands[:8]],
                weights=weights or weight_format_of(cfg))
    plan.routing = route_plan(plan)
    plan.predictions = cost.predictions(plan)
    check_plan(plan)
    plan.compile_s = time.perf_counter() - t0
    return plan
