"""Placement: regions as rectangles on the core grid, then a seeded annealing refinement.

`pack` lays the ops that own cores (matvecs, lookups with their own table, attention) in
execution order along a serpentine of horizontal bands: band 0 left to right, band 1
right to left, and so on, so consecutive ops sit side by side and each layer continues
where the previous one ended. Every region is one band tall (its K rows of MeshGEMV) and
as wide as its tiles need. A layer never straddles two wafers: when the next layer does
not fit in what is left of a wafer, it starts the next one (a pipeline stage boundary).
Vector ops own no cores: they run on the region of the op that produced their input.

`refine` then lowers the sum over data flows of bytes x hops (Manhattan distance between
region centres) by swapping regions of identical shape (e.g. a block's k and v, or gate
and up), with simulated annealing: seeded, a fixed number of moves, so deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict

from compiler.ir import CompilerError, Graph, Op
from compiler.partition import Tiling, tile_op
from compiler.target import Target


@dataclasses.dataclass
class Region:
    """A rectangle of cores on one wafer that holds one op's tiles."""

    op: str
    wafer: int
    row: int  # top-left core
    col: int
    tiling: Tiling

    @property
    def rows(self) -> int:
        return self.tiling.pr

    @property
    def cols(self) -> int:
        return self.tiling.pc

    @property
    def center(self) -> tuple[float, float]:
        return self.row + (self.rows - 1) / 2, self.col + (self.cols - 1) / 2

    def contains(self, r: int, c: int) -> bool:
        return self.row <= r < self.row + self.rows and self.col <= c < self.col + self.cols


class NoFit(CompilerError):
    """The model does not fit the cores allowed; carries the byte counts."""


def placed_ops(g: Graph) -> list[Op]:
    """Ops that get a region of their own, in execution order."""
    return [o for o in g.ops if o.is_tiled or o.kind == "attention"]


def layer_groups(g: Graph) -> list[list[Op]]:
    """Placed ops grouped by layer; ops outside the blocks join the first or last group."""
    groups: dict[int, list[Op]] = defaultdict(list)
    layers = g.layers
    first, last = (layers[0], layers[-1]) if layers else (0, 0)
    seen_block = False
    for o in placed_ops(g):
        if o.layer is not None:
            seen_block = True
            groups[o.layer].append(o)
        else:
            groups[last if seen_block else first].append(o)
    return [groups[k] for k in sorted(groups)]


def hosts(g: Graph) -> dict[str, str]:
    """Op name -> the placed op whose region runs it (itself for placed ops)."""
    out: dict[str, str] = {}
    placed = {o.name for o in placed_ops(g)}
    pending: list[str] = []
    prev = None
    for o in g.ops:
        if o.name in placed:
            out[o.name] = prev = o.name
            for p in pending:  # vector work before the first placed op
                out[p] = o.name
            pending = []
        elif o.kind == "lookup" and o.shares:
            out[o.name] = o.shares
        elif prev is None:
            pending.append(o.name)
        else:
            out[o.name] = prev
    for p in pending:
        out[p] = prev
    for o in g.ops:  # a shared lookup runs where its table's tiles are
        if o.kind == "lookup" and o.shares:
            out[o.name] = o.shares
    return out


@dataclasses.dataclass
class Packing:
    regions: dict[str, Region]
    wafer_layers: list[list[int]]  # layers on each wafer
    span: int  # cores consumed, gaps included (lower is better)


def pack(g: Graph, target: Target, band: int, context: int) -> Packing | None:
    """Serpentine packing with bands `band` rows tall; None if some op cannot fit a band."""
    budget = target.core_budget
    tilings: dict[str, Tiling] = {}
    for o in placed_ops(g):
        t = tile_op(o, band, budget, context)
        if t is None or t.pc > target.cols or t.pr > band:
            return None
        tilings[o.name] = t
    bands = target.rows // band
    regions: dict[str, Region] = {}
    wafer_layers: list[list[int]] = [[]]
    wafer, b, cursor = 0, 0, 0

    def run(group, w, b, cursor, commit):
        for o in group:
            t = tilings[o.name]
            if cursor + t.pc > target.cols:
                b, cursor = b + 1, 0
            if b >= bands:
                return None
            col = cursor if b % 2 == 0 else target.cols - cursor - t.pc
            if commit:
                regions[o.name] = Region(o.name, w, b * band, col, t)
            cursor += t.pc
        return b, cursor

    for group in layer_groups(g):
        end = run(group, wafer, b, cursor, commit=False)
        if end is None:
            if b == 0 and cursor == 0:  # an empty wafer cannot hold this layer
                return None
            wafer, b, cursor = wafer + 1, 0, 0
            wafer_layers.append([])
            if run(group, wafer, b, cursor, commit=False) is None:
                return None
        b, cursor = run(group, wafer, b, cursor, commit=True)
        wafer_layers[wafer].extend(sorted({o.layer for o in group if o.layer is not None}))
    span = wafer * target.cores + b * band * target.cols + cursor * band
    return Packing(regions, wafer_layers, span)


def band_candidates(rows: int) -> list[int]:
    """Band heights to try: every height on small grids, rows // m on large ones."""
    if rows <= 128:
        return list(range(rows, 0, -1))
    return sorted({rows // m for m in range(1, 129)}, reverse=True)


def best_packing(g: Graph, target: Target, context: int) -> tuple[Packing, int] | None:
    """The band height whose packing needs the fewest wafers, then the fewest cores."""
    best = None
    for h in band_candidates(target.rows):
        p = pack(g, target, h, context)
        if p is not None and (best is None or p.span < best[0].span):
            best = (p, h)
    return best


# ---- refinement -------------------------------------------------------------------------

def flows(g: Graph, host: dict[str, str]) -> list[tuple[str, str, int]]:
    """(source region, destination region, bytes per token) of every op-to-op hand-off
    between different regions."""
    out = []
    by_name = {o.name: o for o in g.ops}
    for o in g.ops:
        for i in o.inputs:
            src, dst = host[i], host[o.name]
            if src != dst:
                out.append((src, dst, by_name[i].out_bytes))
    return out


def _hops(a: Region, b: Region) -> float:
    (ra, ca), (rb, cb) = a.center, b.center
    return abs(ra - rb) + abs(ca - cb)


def flow_cost(regions: dict[str, Region], fl: list[tuple[str, str, int]]) -> float:
    """Sum of bytes x hops; flows between wafers count their in-wafer distance only (the
    inter-wafer link is costed separately)."""
    return sum(n * _hops(regions[s], regions[d]) for s, d, n in fl)


def refine(regions: dict[str, Region], fl: list[tuple[str, str, int]], *, seed: int = 0,
           moves_per_region: int = 100) -> tuple[dict[str, Region], float, float]:
    """Simulated annealing over swaps of same-shape regions on the same wafer.

    Returns (regions, cost before, cost after). Deterministic for a given seed.
    """
    regions = {k: dataclasses.replace(v) for k, v in regions.items()}
    before = flow_cost(regions, fl)
    classes: dict[tuple, list[str]] = defaultdict(list)
    for name, r in regions.items():
        classes[(r.wafer, r.rows, r.cols)].append(name)
    swappable = [sorted(v) for v in classes.values() if len(v) > 1]
    if not swappable or not fl:
        return regions, before, before
    touching: dict[str, list[int]] = defaultdict(list)
    for i, (s, d, _) in enumerate(fl):
        touching[s].append(i)
        touching[d].append(i)
    rng = random.Random(seed)
    weights = [len(c) for c in swappable]

    def local(names):
        ids = {i for n in names for i in touching[n]}
        return sum(fl[i][2] * _hops(regions[fl[i][0]], regions[fl[i][1]]) for i in ids)

    def swap(a, b):
        ra, rb = regions[a], regions[b]
        ra.row, rb.row, ra.col, rb.col = rb.row, ra.row, rb.col, ra.col

    n_moves = moves_per_region * len(regions)
    # Start hot enough to accept a typical uphill move, cool geometrically to ~0.
    t0 = max(n for _, _, n in fl) * 2.0
    cost = before
    best_cost, best = before, {k: (r.row, r.col) for k, r in regions.items()}
    for step in range(n_moves):
        temp = t0 * (1e-4 ** (step / n_moves))
        cls = rng.choices(swappable, weights)[0]
        a, b = rng.sample(cls, 2)
        old = local((a, b))
        swap(a, b)
        delta = local((a, b)) - old
        if delta <= 0 or rng.random() < math.exp(-delta / temp):
            cost += delta
            if cost < best_cost - 1e-9:
                best_cost, best = cost, {k: (r.row, r.col) for k, r in regions.items()}
        else:
            swap(a, b)
    for k, (r, c) in best.items():
        regions[k].row, regions[k].col = r, c
    return regions, before, flow_cost(regions, fl)
