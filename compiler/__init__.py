"""Wafer-mapping compiler: trace the decode step, tile weights over a 2D core grid, place,
route, price and check it, and run the placed program.

    import compiler
    plan = compiler.compile("llama3-8b", target="wse3", context=131072)
    print(compiler.format_summary(plan))
    compiler.core(plan, 10, 20); compiler.op_placement(plan, "blocks.0.attn.q")
    compiler.save_json(plan, "plan.json"); plan = compiler.load_json("plan.json")

Passes, in order, each a plain function (imports run one way, down this list):
  frontend.build_graph   the model's traced decode step -> operator graph (ir.Graph)
  partition              ops -> tilings that fit a core's SRAM budget (MeshGEMV tiles,
                         an evenly spread KV cache)
  place.pack / refine    tilings -> rectangles on the grid (serpentine bands, layers in
                         order, pipeline stages over wafers), then annealed swaps
  route.route            every flow on dimension-ordered routes: link loads, routes per
                         core, software relays
  cost.step              the PLMR cost model: a step's critical path, in cycles
  planner.candidates     every mapping (layers per region, band height) that fits,
                         priced with cost.step, fastest first
  api.compile            the passes above -> a plan.Plan

The plan (plan.Plan) is plain data; these are functions over it:
  check.check_plan       its invariants (compile runs it)
  cores                  core, core_bytes, op_placement: what each core holds
  execute                Runner, execute, generate_greedy: the decode step computed tile
                         by tile (verify.logit_diffs checks it against the model)
  summary                summary, format_summary, explain: what `spark compile` prints
  speculate              speculation: a verify step of k rows priced, and the tokens/s
                         speculative decoding gets from it at an acceptance rate
  report.write_report    pictures, a decode-step trace and a Markdown summary
  serialize              save_json, load_json

The public names are imported on first use (PEP 562), so `spark --help` and the
command's option parsing do not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {  # public name -> (module, name there)
    "compile": ("api", "compile"), "resolve_model": ("api", "resolve_model"),
    "check_plan": ("check", "check_plan"),
    "CoreInfo": ("cores", "CoreInfo"), "OpPlacement": ("cores", "OpPlacement"),
    "TileInfo": ("cores", "TileInfo"), "core": ("cores", "core"),
    "core_bytes": ("cores", "core_bytes"), "op_placement": ("cores", "op_placement"),
    "Runner": ("execute", "Runner"), "generate_greedy": ("execute", "generate_greedy"),
    "CompilerError": ("ir", "CompilerError"), "Graph": ("ir", "Graph"), "Op": ("ir", "Op"),
    "check_graph": ("ir", "check_graph"), "format_graph": ("ir", "format_graph"),
    "NoFit": ("place", "NoFit"),
    "Plan": ("plan", "Plan"),
    "write_report": ("report", "write_report"),
    "load_json": ("serialize", "load_json"), "save_json": ("serialize", "save_json"),
    "explain": ("summary", "explain"), "format_summary": ("summary", "format_summary"),
    "expected_tokens": ("speculate", "expected_tokens"),
    "speculation": ("speculate", "speculation"),
    "TARGETS": ("target", "PRESETS"), "Target": ("target", "Target"),
    "TargetError": ("target", "TargetError"), "get_target": ("target", "get_target"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compiler' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f"compiler.{module}"), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from compiler.api import compile, resolve_model
    from compiler.check import check_plan
    from compiler.cores import CoreInfo, OpPlacement, TileInfo, core, core_bytes, op_placement
    from compiler.execute import Runner, generate_greedy
    from compiler.ir import CompilerError, Graph, Op, check_graph, format_graph
    from compiler.place import NoFit
    from compiler.plan import Plan
    from compiler.report import write_report
    from compiler.serialize import load_json, save_json
    from compiler.speculate import expected_tokens, speculation
    from compiler.summary import explain, format_summary
    from compiler.target import PRESETS as TARGETS
    from compiler.target import Target, TargetError, get_target
