"""The Plan: a compiled decode step as plain data.

Per op its region (wafer, top-left core, rows x cols, tiling) and the op whose region runs
it; per wafer its layers; the routed flows and the predicted latency. The passes and the
inspection tools are functions over this record: `cores` (what a core holds), `check`
(the plan's invariants), `summary`, `report`, `serialize` (JSON) and `execute` (running the
placed program); `route` and `cost` fill `routing` and `predictions` when `api.compile`
builds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compiler.ir import Graph
from compiler.place import Region
from compiler.target import Target
from spark_model.config import ModelConfig


@dataclasses.dataclass
class Plan:
    """A compiled decode step for one model on one target."""

    cfg: ModelConfig
    target: Target
    context: int  # KV cache capacity the plan reserves, positions.
    graph: Graph
    regions: dict[str, Region]
    host: dict[str, str]  # Op name -> the placed op whose region runs it.
    band: int  # Rows per band of the serpentine (= pr of the tallest regions).
    wafer_layers: list[list[int]]
    placement_cost: tuple[float, float]  # bytes x hops before and after refinement
    max_context: int  # Largest cache capacity that fits the same wafers.
    compile_s: float = 0.0
    source: str = ""  # Preset name or checkpoint path.
    share: int = 1  # Layers whose ops share one set of regions (see planner.py).
    # How the matrices are stored on the cores: 'f32', 'bf16', 'q8_0', 'q4_0' or 'q4_1'
    # (compiler.ir.WEIGHT_FORMATS), or another dtype name for a model's own dtype.
    weights: str = "f32"
    alternatives: list[dict] = dataclasses.field(default_factory=list)  # planner's best
    # Every flow routed (a compiler.route.Routing); None until routed.
    routing: Any = dataclasses.field(default=None, repr=False)
    # compiler.cost.predictions of this plan; empty until costed.
    predictions: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def wafers(self) -> int:
        return len(self.wafer_layers)
