"""Wafer-mapping compiler: trace the decode step, tile weights over a 2D core grid, place, execute.

    plan = compiler.compile("llama3-8b", target="wse3", context=131072)
    print(plan.format_summary())
    plan.core(10, 20); plan.op("blocks.0.attn.q")

Passes, each a plain function over one data model:
  frontend.build_graph   the model's traced decode step -> operator graph (ir.Graph)
  partition              ops -> tilings that fit a core's SRAM budget (MeshGEMV tiles,
                         an evenly spread KV cache)
  place.pack / refine    tilings -> rectangles on the grid (serpentine bands, layers in
                         order, pipeline stages over wafers), then annealed swaps
  plan.Plan.execute      the decode step computed tile by tile, checked against the model
"""

from compiler.api import compile, resolve_model
from compiler.ir import CompilerError, Graph, Op, check_graph, format_graph
from compiler.place import NoFit
from compiler.plan import CoreInfo, OpPlacement, Plan
from compiler.target import PRESETS as TARGETS
from compiler.target import Target, TargetError, get_target

__all__ = ["compile", "resolve_model", "CompilerError", "Graph", "Op", "check_graph",
           "format_graph", "NoFit", "CoreInfo", "OpPlacement", "Plan", "TARGETS", "Target",
           "TargetError", "get_target"]
