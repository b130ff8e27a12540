"""Plans as JSON: `save_json(plan, path)` and `load_json(path)` (over `plan_to_dict` and
`plan_from_dict`).

Schema (version 1), one JSON object:

  schema       "spark-plan/1"
  source       the preset name or checkpoint path the plan was compiled from
  model        the ModelConfig fields (spark_model.config)
  target       the Target fields (compiler.target): grid, SRAM, clock, link figures
  context      KV cache positions reserved
  band         rows per serpentine band
  max_context  largest cache capacity that fits the same wafers
  compile_s    seconds the compile took
  placement_cost  [bytes x hops before refinement, after]
  wafer_layers [[layer, ...] per wafer]
  share        layers per set of regions (0: every op overlaid on the whole wafer)
  weights      how the matrices are stored: 'f32', 'bf16', 'q8_0', 'q4_0', 'q4_1' (absent
               in older plans: the model's parameter dtype)
  alternatives the planner's best mappings: {mapping, layers_per_region, band_rows,
               wafers, cores, decode_tokens_per_s}
  ops          [{name, kind, layer, inputs, out_bytes, weight, k, n, transposed,
                 weight_dtype, shares, params, roles, kv_bytes_per_token, heads,
                 host}, ...] in execution order
  regions      {op name: {wafer, row, col, group, pr, pc, k, n, wbytes, positions, dh, hd,
                 kv_bytes, buffers, share, rk, rn, kblock, nblock}}: the rectangle at (row, col) of pr x pc
                 cores (group: the op whose cores it shares), with the tiling fields of
                 compiler.partition.Tiling
  summary      compiler.summary.summary(plan) at save time (for readers; ignored on load)

Loading rebuilds the operator graph from `model` (tracing is deterministic) and checks
that it matches the saved ops, then routes and costs the plan again, so a loaded plan can
be executed, checked and summarised like a compiled one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from compiler import cost, frontend
from compiler.ir import WEIGHT_FORMATS, CompilerError, Op, weight_format_of
from compiler.partition import Tiling
from compiler.place import Region
from compiler.plan import Plan
from compiler.route import route_plan
from compiler.summary import summary
from compiler.target import Target
from spark_model.config import ModelConfig

SCHEMA = "spark-plan/1"
_OP_FIELDS = [f.name for f in dataclasses.fields(Op) if f.name != "eqns"]
_TILING_FIELDS = [f.name for f in dataclasses.fields(Tiling)]
_TILING_DEFAULTS = {"kblock", "nblock"}  # absent from plans saved before packed weights


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    ops = []
    for o in plan.graph.ops:
        d = {k: getattr(o, k) for k in _OP_FIELDS}
        d["inputs"], d["params"], d["roles"] = list(o.inputs), list(o.params), list(o.roles)
        d["heads"] = list(o.heads)
        d["host"] = plan.host[o.name]
        ops.append(d)
    regions = {name: {"wafer": r.wafer, "row": r.row, "col": r.col, "group": r.group,
                      **{k: getattr(r.tiling, k) for k in _TILING_FIELDS}}
               for name, r in plan.regions.items()}
    return {
        "schema": SCHEMA, "source": plan.source, "model": plan.cfg.to_dict(),
        "target": plan.target.to_dict(), "context": plan.context, "band": plan.band,
        "max_context": plan.max_context, "compile_s": plan.compile_s,
        "placement_cost": list(plan.placement_cost), "wafer_layers": plan.wafer_layers,
        "share": plan.share, "weights": plan.weights, "alternatives": plan.alternatives,
        "ops": ops, "regions": regions, "summary": summary(plan),
    }


def plan_from_dict(data: dict[str, Any]) -> Plan:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise CompilerError(f"not a plan of schema {SCHEMA!r} (found {found!r})")
    try:
        cfg = ModelConfig.from_dict(data["model"])
        target = Target(**data["target"])
        weights = str(data.get("weights") or weight_format_of(cfg))
        graph = frontend.build_graph(cfg, weights=weights if weights in WEIGHT_FORMATS
                                     else None)
        saved = [(o["name"], o["kind"]) for o in data["ops"]]
        if saved != [(o.name, o.kind) for o in graph.ops]:
            raise CompilerError("the saved ops do not match the model's traced decode step "
                                "(saved by another version of the model code?)")
        regions = {}
        for name, r in data["regions"].items():
            tiling = Tiling(**{k: int(r[k]) for k in _TILING_FIELDS
                               if k in r or k not in _TILING_DEFAULTS})
            regions[name] = Region(name, int(r["wafer"]), int(r["row"]), int(r["col"]), tiling,
                                   group=r.get("group"))
        host = {o["name"]: o["host"] for o in data["ops"]}
        plan = Plan(cfg=cfg, target=target, context=int(data["context"]), graph=graph,
                    regions=regions, host=host, band=int(data["band"]),
                    wafer_layers=[list(map(int, w)) for w in data["wafer_layers"]],
                    placement_cost=tuple(map(float, data["placement_cost"])),
                    max_context=int(data["max_context"]), compile_s=float(data["compile_s"]),
                    source=str(data["source"]), share=int(data.get("share", 1)),
                    alternatives=list(data.get("alternatives", [])), weights=weights)
        plan.routing = route_plan(plan)
        plan.predictions = cost.predictions(plan)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CompilerError):
            raise
        raise CompilerError(f"malformed plan JSON: {type(e).__name__}: {e}") from None
    return plan


def save_json(plan: Plan, path) -> Path:
    """Write the plan as JSON (the schema above), atomically (a temporary file renamed
    into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan_to_dict(plan), indent=1))
    tmp.replace(path)
    return path


def load_json(path) -> Plan:
    """Read a plan written by save_json; it can be executed and costed again."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompilerError(f"cannot read plan {path}: {e}") from None
    return plan_from_dict(data)
