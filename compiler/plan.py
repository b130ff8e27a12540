"""The Plan: where every op, tile and cache position of the decode step lives.

Per op its region (wafer, top-left core, rows x cols) and tiling; per core its tile and
bytes; per wafer its layers. A plan can run the decode step the way the placed program
does (`execute`), which is how the lowering is checked against the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compiler.ir import Graph, Op
from compiler.partition import bounds
from compiler.place import Region
from compiler.target import Target
from spark_model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CoreInfo:
    """What one core holds."""

    wafer: int
    row: int
    col: int
    op: str | None  # The op whose tile or cache share it holds (None: idle core).
    tile: tuple[int, int] | None  # (i, j) within the op's pr x pc tile grid.
    k_range: tuple[int, int] | None  # matvec: rows of the (K, N) weight it holds.
    n_range: tuple[int, int] | None  # matvec: columns.
    positions: int  # attention: cache positions it holds.
    hosted: tuple[str, ...]  # Vector ops that run on this core's region.
    bytes: int  # SRAM in use (tile or cache share, buffers, hosted parameters).


@dataclasses.dataclass(frozen=True)
class OpPlacement:
    op: Op
    host: str  # The op whose region runs it (itself for placed ops).
    region: Region


@dataclasses.dataclass
class Plan:
    """A compiled decode step for one model on one target."""

    cfg: ModelConfig
    target: Target
    context: int  # KV cache capacity the plan reserves, positions.
    graph: Graph
    regions: dict[str, Region]
    host: dict[str, str]
    band: int  # Rows per band of the serpentine (= pr of the tallest regions).
    wafer_layers: list[list[int]]
    placement_cost: tuple[float, float]  # bytes x hops before and after refinement
    max_context: int  # Largest cache capacity that fits the same wafers.
    compile_s: float = 0.0
    source: str = ""  # Preset name or checkpoint path.
    _steps: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)

    # ---- queries ---------------------------------------------------------------------

    @property
    def wafers(self) -> int:
        return len(self.wafer_layers)

    def op(self, name: str) -> OpPlacement:
        op = self.graph.op(name)
        return OpPlacement(op=op, host=self.host[name], region=self.regions[self.host[name]])

    def _hosted(self) -> dict[str, list[Op]]:
        out: dict[str, list[Op]] = {}
        for o in self.graph.ops:
            if o.name not in self.regions:
                out.setdefault(self.host[o.name], []).append(o)
        return out

    def _hosted_bytes(self, region: str, ops: list[Op]) -> int:
        cores = self.regions[region].tiling.cores
        total = 0
        for o in ops:
            for p in o.params:
                info = self.graph.params[p]
                total += -(-info.size // cores) * np.dtype(info.dtype).itemsize
        return total

    def core(self, row: int, col: int, wafer: int = 0) -> CoreInfo:
        t = self.target
        if not (0 <= wafer < self.wafers and 0 <= row < t.rows and 0 <= col < t.cols):
            raise IndexError(f"core ({row}, {col}) on wafer {wafer} is outside the plan's "
                             f"{self.wafers} wafer(s) of {t.rows} x {t.cols}")
        hosted = self._hosted()
        for name, r in self.regions.items():
            if r.wafer == wafer and r.contains(row, col):
                i, j = row - r.row, col - r.col
                tl = r.tiling
                op = self.graph.op(name)
                kr = nr = None
                if op.is_tiled:
                    kb, nb = bounds(tl.k, tl.pr), bounds(tl.n, tl.pc)
                    kr, nr = (int(kb[i]), int(kb[i + 1])), (int(nb[j]), int(nb[j + 1]))
                ops = hosted.get(name, [])
                return CoreInfo(wafer, row, col, name, (i, j), kr, nr, tl.positions,
                                tuple(o.name for o in ops),
                                int(tl.core_bytes()[i, j]) + self._hosted_bytes(name, ops))
        return CoreInfo(wafer, row, col, None, None, None, None, 0, (), 0)

    def core_bytes(self) -> np.ndarray:
        """Bytes in use on every core, (wafers, rows, cols)."""
        out = np.zeros((self.wafers, self.target.rows, self.target.cols), np.int64)
        hosted = self._hosted()
        for name, r in self.regions.items():
            extra = self._hosted_bytes(name, hosted.get(name, []))
            out[r.wafer, r.row:r.row + r.rows, r.col:r.col + r.cols] = (
                r.tiling.core_bytes() + extra)
        return out

    def summary(self) -> dict[str, Any]:
        """The figures `spark compile --json` prints."""
        used = self.core_bytes()
        busy = used[used > 0]
        g = self.graph
        tiled = [o for o in g.ops if o.is_tiled]
        attn = [o for o in g.ops if o.kind == "attention"]
        return {
            "model": self.source,
            "target": self.target.name,
            "context": self.context,
            "params": int(sum(p.size for p in g.params.values())),
            "weight_bytes": int(sum(p.nbytes for p in g.params.values())),
            "kv_cache_bytes": int(sum(o.kv_bytes_per_token for o in attn) * self.context),
            "ops": len(g.ops),
            "tiles": int(sum(self.regions[o.name].tiling.cores for o in tiled)),
            "kv_cores": int(sum(self.regions[o.name].tiling.cores for o in attn)),
            "cores_used": int(busy.size),
            "cores_available": self.wafers * self.target.cores,
            "wafers": self.wafers,
            "wafer_layers": [[min(w), max(w)] if w else [] for w in self.wafer_layers],
            "band_rows": self.band,
            "sram_mean_fraction": float(busy.mean() / self.target.sram_bytes) if busy.size else 0.0,
            "sram_max_fraction": float(busy.max() / self.target.sram_bytes) if busy.size else 0.0,
            "max_context": self.max_context,
            "placement_cost_before": self.placement_cost[0],
            "placement_cost_after": self.placement_cost[1],
            "compile_s": round(self.compile_s, 3),
        }

    def format_summary(self) -> str:
        s = self.summary()
        gib = 1024 ** 3
        lines = [
            f"{s['model']} on {s['target']} at context {s['context']:,}",
            f"  parameters      {s['params']:,} ({s['weight_bytes'] / gib:.3f} GiB)",
            f"  KV cache        {s['kv_cache_bytes'] / gib:.3f} GiB on {s['kv_cores']:,} cores",
            f"  ops / tiles     {s['ops']} ops, {s['tiles']:,} weight tiles",
            f"  cores used      {s['cores_used']:,} of {s['cores_available']:,} "
            f"({s['wafers']} wafer(s); bands of {s['band_rows']} rows)",
        ]
        for w, layers in enumerate(s["wafer_layers"]):
            lines.append(f"    wafer {w}: layers {layers[0]}-{layers[1]}" if layers
                         else f"    wafer {w}: no layers")
        lines += [
            f"  SRAM per core   mean {s['sram_mean_fraction']:.1%}, max "
            f"{s['sram_max_fraction']:.1%} of {self.target.sram_bytes:,} B "
            f"(budget {1 - self.target.reserve_fraction:.0%})",
            f"  largest context {s['max_context']:,} positions on these wafers",
            f"  placement       bytes x hops {s['placement_cost_before']:,.0f} -> "
            f"{s['placement_cost_after']:,.0f} after refinement",
            f"  compile time    {s['compile_s']:.2f} s",
        ]
        return "\n".join(lines)

    # ---- functional execution ----------------------------------------------------------

    def _step(self, cache_len: int):
        from compiler import execute, frontend

        if cache_len not in self._steps:
            g = frontend.build_graph(self.cfg, cache_len)
            tilings = {name: r.tiling for name, r in self.regions.items()}
            self._steps[cache_len] = execute.make_step(g, tilings, self.host)
        return self._steps[cache_len]

    def leaves(self, params: Any) -> list[jax.Array]:
        """Parameters in the traced step's argument order, from a flat dict {name: array},
        a Transformer or a loaded SparkModel."""
        from spark_model.checkpoint import flat_params

        if hasattr(params, "tokenizer") and hasattr(params, "model"):  # a SparkModel
            params = params.model
        if not isinstance(params, dict):
            params = flat_params(params)
        missing = [n for n in self.graph.param_order if n not in params]
        if missing:
            raise ValueError(f"parameters missing for this plan: {missing[:5]}")
        out = []
        for n in self.graph.param_order:
            info = self.graph.params[n]
            a = jnp.asarray(params[n])
            if tuple(a.shape) != info.shape:
                raise ValueError(f"parameter {n} has shape {tuple(a.shape)}, the plan was "
                                 f"compiled for {info.shape}")
            out.append(a.astype(info.dtype))
        return out

    def execute(self, params: Any, tokens_bt, positions_bt, cache):
        """One decode step through the placed program: (logits (B, 1, V), new cache).

        `cache` is a spark_model KVCache of any capacity; the attention op spreads it over
        the cores of its region.
        """
        leaves = params if isinstance(params, list) else self.leaves(params)
        tokens = jnp.asarray(tokens_bt, jnp.int32)
        positions = jnp.asarray(positions_bt, jnp.int32)
        if tokens.shape != (1, 1) or positions.shape != (1, 1):
            raise ValueError("a plan runs one token of one sequence: tokens and positions "
                             f"must be (1, 1), got {tokens.shape} and {positions.shape}")
        return self._step(cache.length)(leaves, tokens, positions, cache)

    def generate_greedy(self, params: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                        capacity: int = 2048) -> list[int]:
        """Greedy decoding through the executed plan, one token per step."""
        from spark_model.kv_cache import init_cache

        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("the prompt must hold at least one token")
        if len(ids) + max_new_tokens > capacity:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the capacity {capacity}")
        leaves = self.leaves(params)
        cache = init_cache(self.cfg, 1, capacity)
        out: list[int] = []
        for pos in range(len(ids) + max_new_tokens - 1):
            tok = ids[pos] if pos < len(ids) else out[-1]
            logits, cache = self.execute(leaves, [[tok]], [[pos]], cache)
            if pos >= len(ids) - 1:
                out.append(int(jnp.argmax(logits[0, -1])))
        return out
