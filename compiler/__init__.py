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

The public names are imported on first use (PEP 562), so `spark --help` and the
command's option parsing do not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {  # public name -> (module, name there)
    "compile": ("api", "compile"), "resolve_model": ("api", "resolve_model"),
    "CompilerError": ("ir", "CompilerError"), "Graph": ("ir", "Graph"), "Op": ("ir", "Op"),
    "check_graph": ("ir", "check_graph"), "format_graph": ("ir", "format_graph"),
    "NoFit": ("place", "NoFit"),
    "CoreInfo": ("plan", "CoreInfo"), "OpPlacement": ("plan", "OpPlacement"),
    "Plan": ("plan", "Plan"),
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
    from compiler.ir import CompilerError, Graph, Op, check_graph, format_graph
    from compiler.place import NoFit
    from compiler.plan import CoreInfo, OpPlacement, Plan
    from compiler.target import PRESETS as TARGETS
    from compiler.target import Target, TargetError, get_target
