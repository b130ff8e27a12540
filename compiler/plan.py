"""The Plan: where every op, tile and cache position of the decode step lives.

Per op its region (wafer, top-left core, rows x cols) and tiling; per core its tile and
bytes; per wafer its layers. A plan can run the decode step the way the placed program
does (`execute`), which is how the lowering is checked against the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compiler.ir import Graph, Op
from compiler.planner import mapping_name
from compiler.place import Region
from compiler.target import Target
from spark_model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TileInfo:
    """One op's share of a core."""

    op: str
    index: tuple[int, int]  # (i, j) within the op's pr x pc tile grid.
    k_range: tuple[int, int] | None  # matvec/lookup: rows of the (K, N) weight held.
    n_range: tuple[int, int] | None  # matvec/lookup: columns held.
    positions: int  # attention: cache positions held (of one kv head).
    bytes: int


@dataclasses.dataclass(frozen=True)
class CoreInfo:
    """What one core holds: a tile per op whose region covers it (several when layers
    share regions), the vector ops that run there, and the bytes in use."""

    wafer: int
    row: int
    col: int
    tiles: tuple[TileInfo, ...]
    hosted: tuple[str, ...]
    bytes: int

    @property
    def op(self) -> str | None:
        return self.tiles[0].op if self.tiles else None


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
    share: int = 1  # Layers whose ops share one set of regions (see planner.py).
    alternatives: list[dict] = dataclasses.field(default_factory=list)  # planner's best
    _steps: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

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
        tiles, runs, extra = [], [], 0
        for name, r in self.regions.items():
            if not (r.wafer == wafer and r.contains(row, col)):
                continue
            i, j = row - r.row, col - r.col
            tl = r.tiling
            kr = nr = None
            if tl.k:
                kb, nb = tl.k_bounds(), tl.n_bounds()
                kr, nr = (int(kb[i]), int(kb[i + 1])), (int(nb[j]), int(nb[j + 1]))
            tiles.append(TileInfo(name, (i, j), kr, nr, tl.positions, int(tl.core_bytes()[i, j])))
            ops = hosted.get(name, [])
            runs += [o.name for o in ops]
            extra += self._hosted_bytes(name, ops)
        return CoreInfo(wafer, row, col, tuple(tiles), tuple(runs),
                        sum(x.bytes for x in tiles) + extra)

    def core_bytes(self) -> np.ndarray:
        """Bytes in use on every core, (wafers, rows, cols)."""
        out = np.zeros((self.wafers, self.target.rows, self.target.cols), np.int64)
        hosted = self._hosted()
        for name, r in self.regions.items():
            extra = self._hosted_bytes(name, hosted.get(name, []))
            out[r.wafer, r.row:r.row + r.rows, r.col:r.col + r.cols] += (
                r.tiling.core_bytes() + extra)
        return out

    # ---- routing and predicted latency -------------------------------------------------

    def routing(self):
        """Every flow routed (compiler.route.Routing), computed once."""
        from compiler.route import route

        if "routing" not in self._cache:
            self._cache["routing"] = route(self)
        return self._cache["routing"]

    def step_cost(self, context: int | None = None, tokens: int = 1):
        """The cost model's critical path for one decode step with `context` positions
        filled (tokens > 1: a prefill of that many tokens)."""
        from compiler import cost

        return cost.step(self, self.routing(), context or self.context, tokens)

    def predictions(self, prompt_tokens: int = 1000) -> dict[str, Any]:
        """Predicted decode speed at 1K, 32K and 128K (those within the plan's context),
        time to first token for a `prompt_tokens` prompt, and where the time goes."""
        key = f"pred{prompt_tokens}"
        if key in self._cache:
            return self._cache[key]
        t = self.target
        contexts = [c for c in (1024, 32_768, 131_072) if c <= self.context] or [self.context]
        speed, breakdown = {}, {}
        for c in contexts:
            sc = self.step_cost(c)
            speed[str(c)] = 1.0 / sc.seconds(t)
            breakdown[str(c)] = _breakdown(sc, t)
        n = min(prompt_tokens, self.context)
        prefill = self.step_cost(n, tokens=n)
        out = {"decode_tokens_per_s": speed, "ttft_s": prefill.seconds(t),
               "ttft_prompt_tokens": n, "breakdown": breakdown[str(contexts[-1])],
               "breakdown_by_context": breakdown, "routing": self.routing().summary()}
        self._cache[key] = out
        return out

    def _kv_cores(self, attn: list[Op]) -> int:
        """Distinct cores that hold some KV cache (overlaid layers share cores)."""
        rects = {(r.wafer, r.row, r.col, r.rows, r.cols) for r in
                 (self.regions[o.name] for o in attn)}
        mask = np.zeros((self.wafers, self.target.rows, self.target.cols), bool)
        for w, r0, c0, nr, nc in rects:
            mask[w, r0:r0 + nr, c0:c0 + nc] = True
        return int(mask.sum())

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
            "kv_cores": self._kv_cores(attn),
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
            "layers_per_region": self.share,
            "mapping": mapping_name(self.share),
            "compile_s": round(self.compile_s, 3),
            **self.predictions(),
            "alternatives": self.alternatives,
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
            f"({s['wafers']} wafer(s))",
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
            f"  mapping         {mapping_name(self.share)}; regions {s['band_rows']} rows tall",
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

    def explain(self) -> str:
        """The planner's best alternatives, fastest first."""
        lines = ["planner: mappings that fit, fastest predicted first (at context "
                 f"{self.context:,})",
                 f"  {'mapping':<34} {'rows':>5} {'wafers':>6} {'cores':>10} {'tokens/s':>9}"]
        for a in self.alternatives:
            lines.append(f"  {a['mapping']:<34} {a['band_rows']:>5} {a['wafers']:>6} "
                         f"{a['cores']:>10,} {a['decode_tokens_per_s']:>9,.0f}")
        return "\n".join(lines)

    # ---- saving and inspecting -----------------------------------------------------------

    def to_json(self, path) -> Path:
        """Write the plan as JSON (schema in compiler/serialize.py)."""
        from compiler.serialize import save_json

        return save_json(self, path)

    @classmethod
    def from_json(cls, path) -> "Plan":
        """Read a plan written by to_json; it can execute and be costed again."""
        from compiler.serialize import load_json

        return load_json(path)

    def report(self, directory) -> Path:
        """Write the JSON, pictures, a decode-step trace and a Markdown summary."""
        from compiler.report import write_report

        return write_report(self, directory)

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


def _breakdown(sc, t) -> dict[str, float]:
    """Seconds per token on the critical path: compute, hops, routing stages, link
    transfer and the inter-wafer link; a link-bound step adds the rest as 'link_bound'."""
    sec = sc.total.seconds(t)
    out = {"compute": sec["compute"], "hops": sec["hops"], "routing_stages": sec["stages"],
           "transfer": sec["transfer"], "inter_wafer": sec["wafer"]}
    extra = sc.seconds(t) - sc.total.total / t.clock_hz
    if extra > 0:
        out["link_bound"] = extra
    return out
