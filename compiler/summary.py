"""A plan's figures: `summary` (what `spark compile --json` prints), `format_summary`
(the text `spark compile` prints) and `explain` (the planner's alternatives)."""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler import cost
from compiler.cores import core_bytes
from compiler.ir import Op
from compiler.place import mapping_name
from compiler.plan import Plan


def _kv_cores(plan: Plan, attn: list[Op]) -> int:
    """Distinct cores that hold some KV cache (overlaid layers share cores)."""
    rects = {(r.wafer, r.row, r.col, r.rows, r.cols) for r in
             (plan.regions[o.name] for o in attn)}
    mask = np.zeros((plan.wafers, plan.target.rows, plan.target.cols), bool)
    for w, r0, c0, nr, nc in rects:
        mask[w, r0:r0 + nr, c0:c0 + nc] = True
    return int(mask.sum())


def summary(plan: Plan) -> dict[str, Any]:
    """The figures `spark compile --json` prints."""
    used = core_bytes(plan)
    busy = used[used > 0]
    g = plan.graph
    tiled = [o for o in g.ops if o.is_tiled]
    attn = [o for o in g.ops if o.kind == "attention"]
    return {
        "model": plan.source,
        "target": plan.target.name,
        "context": plan.context,
        "params": int(sum(p.size for p in g.params.values())),
        "weights": plan.weights,
        "weight_bytes": g.weight_bytes(),
        "kv_cache_bytes": int(sum(o.kv_bytes_per_token for o in attn) * plan.context),
        "ops": len(g.ops),
        "tiles": int(sum(plan.regions[o.name].tiling.cores for o in tiled)),
        "kv_cores": _kv_cores(plan, attn),
        "cores_used": int(busy.size),
        "cores_available": plan.wafers * plan.target.cores,
        "wafers": plan.wafers,
        "wafer_layers": [[min(w), max(w)] if w else [] for w in plan.wafer_layers],
        "band_rows": plan.band,
        "sram_mean_fraction": float(busy.mean() / plan.target.sram_bytes) if busy.size else 0.0,
        "sram_max_fraction": float(busy.max() / plan.target.sram_bytes) if busy.size else 0.0,
        "max_context": plan.max_context,
        "placement_cost_before": plan.placement_cost[0],
        "placement_cost_after": plan.placement_cost[1],
        "layers_per_region": plan.share,
        "mapping": mapping_name(plan.share),
        "compile_s": round(plan.compile_s, 3),
        **(plan.predictions or cost.predictions(plan)),
        "alternatives": plan.alternatives,
    }


def format_summary(plan: Plan) -> str:
    """The text `spark compile` prints."""
    s = summary(plan)
    gib = 1024 ** 3
    lines = [
        f"{s['model']} on {s['target']} at context {s['context']:,}",
        f"  parameters      {s['params']:,} ({s['weight_bytes'] / gib:.3f} GiB as "
        f"{s['weights']})",
        f"  KV cache        {s['kv_cache_bytes'] / gib:.3f} GiB on {s['kv_cores']:,} cores",
        f"  ops / tiles     {s['ops']} ops, {s['tiles']:,} weight tiles",
        f"  cores used      {s['cores_used']:,} of {s['cores_available']:,} "
        f"({s['wafers']} wafer(s))",
    ]
    for w, layers in enumerate(s["wafer_layers"]):
        lines.append(f"    wafer {w}: layers {layers[0]}-{layers[1]}" if layers
                     else f"    wafer {w}: no layers")
    lines += [
        f"  SRAM per core   mean {s['sram_mean_fraction']:.1%}, max "
        f"{s['sram_max_fraction']:.1%} of {plan.target.sram_bytes:,} B "
        f"(budget {1 - plan.target.reserve_fraction:.0%})",
        f"  largest context {s['max_context']:,} positions on these wafers",
        f"  placement       bytes x hops {s['placement_cost_before']:,.0f} -> "
        f"{s['placement_cost_after']:,.0f} after refinement",
        f"  mapping         {mapping_name(plan.share)}; regions {s['band_rows']} rows tall",
        f"  routing         busiest link {s['routing']['max_link_bytes_per_token']:,.0f} "
        f"B/token; up to {s['routing']['max_routes_per_core']} routes per core "
        f"(limit {s['routing']['route_limit']}), {s['routing']['relay_stages']} relay stages",
    ]
    for c, tps in s["decode_tokens_per_s"].items():
        lines.append(f"  decode at {int(c):>7,} {tps:>10,.0f} tokens/s (predicted, batch 1)")
    lines.append(f"  TTFT            {s['ttft_s'] * 1e3:.3f} ms for a "
                 f"{s['ttft_prompt_tokens']:,}-token prompt (predicted)")
    b = s["breakdown"]
    total = sum(b.values()) or 1.0
    lines.append("  per token       " + ", ".join(
        f"{k} {v * 1e6:.1f} us ({v / total:.0%})" for k, v in b.items()))
    lines.append(f"  compile time    {s['compile_s']:.2f} s")
    return "\n".join(lines)


def explain(plan: Plan) -> str:
    """The planner's best alternatives, fastest first."""
    lines = ["planner: mappings that fit, fastest predicted first (at context "
             f"{plan.context:,})",
             f"  {'mapping':<34} {'rows':>5} {'wafers':>6} {'cores':>10} {'tokens/s':>9}"]
    for a in plan.alternatives:
        lines.append(f"  {a['mapping']:<34} {a['band_rows']:>5} {a['wafers']:>6} "
                     f"{a['cores']:>10,} {a['decode_tokens_per_s']:>9,.0f}")
    return "\n".join(lines)
