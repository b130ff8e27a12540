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

import numpy as np

from compiler.ir import CompilerError, Graph, Op
from compiler.partition import Tiling, bounds, tile_op
from compiler.target import Target


@dataclasses.dataclass
class Region:
    """A rectangle of cores on one wafer that holds one op's tiles."""

    op: str
    wafer: int
    row: int  # top-left core
    col: int
    tiling: Tiling
    group: str | None = None  # the op whose rectangle this one shares (None: its own)

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
    regions: dict[str, Region]  # op -> its rectangle (ops that share cores share the object)
    wafer_layers: list[list[int]]  # layers on each wafer
    span: int  # cores consumed, gaps included (lower is better)
    share: int = 1  # layers whose ops share one set of regions (0: all ops overlaid)
    overlay_loads: list | None = None  # share 0: per wafer (weights, KV per position, buffers)


def _share_groups(groups: list[list[Op]], share: int) -> list[list[list[Op]]] | None:
    """Layer groups in runs of `share`; None if the layers of a run differ in shape."""
    runs = [groups[i:i + share] for i in range(0, len(groups), share)]
    for run in runs:
        shapes = [[(o.kind, o.k, o.n, o.weight_dtype, o.kv_bytes_per_token, o.heads)
                   for o in grp if o.layer is not None] for grp in run]
        if any(s != shapes[0] for s in shapes):
            return None
    return runs


def pack(g: Graph, target: Target, band: int, context: int, share: int = 1
         ) -> Packing | None:
    """Serpentine packing with bands `band` rows tall; None if some op cannot fit.

    share: that many consecutive layers keep their weights (and KV caches) on the same
    regions: a core then holds that op's tiles of every layer of the run (and one set of
    working buffers, which they use in turn). share=1 gives every op of every layer cores
    of its own; a larger share spreads each matrix over share times more cores.
    """
    groups = layer_groups(g)
    runs = _share_groups(groups, share)
    if runs is None or band > target.rows:
        return None
    bands = target.rows // band
    regions: dict[str, Region] = {}
    wafer_layers: list[list[int]] = [[]]
    wafer, b, cursor = 0, 0, 0

    def tilings(run) -> list[tuple[Op, Tiling, list[Op]]] | None:
        """(op, tiling, ops sharing its region) for the first layer of a run."""
        out = []
        first = run[0]
        layered = [[o for o in grp if o.layer is not None] for grp in run]
        for o in first:
            if o.layer is None:  # embedding or head: cores of its own
                t, sharers = tile_op(o, band, target.core_budget, context), [o]
            else:
                i = layered[0].index(o)
                t = tile_op(o, band, target.core_budget, context, len(run))
                sharers = [lay[i] for lay in layered]
            if t is None or t.pc > target.cols:
                return None
            out.append((o, t, sharers))
        for grp in run[1:]:  # ops outside the blocks that joined a later layer's group
            for o in grp:
                if o.layer is None:
                    t = tile_op(o, band, target.core_budget, context)
                    if t is None or t.pc > target.cols:
                        return None
                    out.append((o, t, [o]))
        return out

    def run_packing(items, w, b, cursor, commit):
        for o, t, sharers in items:
            if cursor + t.pc > target.cols:
                b, cursor = b + 1, 0
            if b >= bands:
                return None
            col = cursor if b % 2 == 0 else target.cols - cursor - t.pc
            if commit:
                for s in sharers:  # same rectangle and tiling (the shapes are equal)
                    regions[s.name] = Region(s.name, w, b * band, col, t,
                                             group=None if s is o else o.name)
            cursor += t.pc
        return b, cursor

    for run in runs:
        items = tilings(run)
        if items is None:
            return None
        end = run_packing(items, wafer, b, cursor, commit=False)
        if end is None:
            if b == 0 and cursor == 0:  # an empty wafer cannot hold this run of layers
                return None
            wafer, b, cursor = wafer + 1, 0, 0
            wafer_layers.append([])
            if run_packing(items, wafer, b, cursor, commit=False) is None:
                return None
        b, cursor = run_packing(items, wafer, b, cursor, commit=True)
        wafer_layers[wafer].extend(sorted({o.layer for grp in run for o in grp
                                           if o.layer is not None}))
    span = wafer * target.cores + b * band * target.cols + cursor * band
    return Packing(regions, wafer_layers, span, share)


def _overlay_vectors(t: Tiling, R: int, C: int, col: int = 0, row: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(a, b, is_kv): this op's bytes on core (i, j) are a[i] * b[j] (for the KV cache, per
    cached position per row of cores); its region starts at core (`row`, `col`)."""
    a, b = np.zeros(R), np.zeros(C)
    if t.k:
        a[row:row + t.pr] = np.diff(t.k_bounds()) // t.kblock * t.wbytes  # blocks x bytes
        b[col:col + t.pc] = np.diff(t.n_bounds()) // t.nblock
        return a, b, False
    a[:t.pr] = t.kv_bytes
    b[col:col + t.pc] = np.tile(np.diff(bounds(t.hd, t.cols_per_head, t.rn)),
                                t.pc // t.cols_per_head)
    return a, b, True


def pack_overlay(g: Graph, target: Target, context: int) -> Packing | None:
    """Every op of every layer spread over the whole wafer (WaferLLM's mapping): each core
    holds a tile of every matrix and a share of every layer's cache; layers fill a wafer
    until a core's budget would be exceeded, then the next wafer takes over. Successive ops
    start their larger (uneven) parts on different rows and columns, so no core collects
    every op's larger part. A packed matrix with fewer K parts than the wafer has rows
    (split only between whole 32-weight blocks: a K of 4,096 covers 128 rows), or a packed
    table with fewer column parts than columns, sits on a band: of the bands at multiples
    of its height (width), the one whose cores hold the fewest weight bytes so far, so the
    matrices together still fill the wafer and few distinct rectangles need routes. None
    if one layer alone exceeds a core's budget."""
    from compiler.partition import overlay_tiling

    R, C = target.rows, target.cols
    wafers: list[list[tuple[Op, Tiling]]] = [[]]
    loads: list[list[np.ndarray | int]] = []  # per wafer: weights, KV per position, buffers
    weights, kv, buffers = np.zeros((R, C)), np.zeros((R, C)), 0
    layer_w = np.zeros((R, C))  # this layer's weight bytes per core, as placed so far
    kv_hint = _kv_hint(g, target, context)  # where every layer's cache will lie
    off_k = off_n = 0
    for grp in layer_groups(g):
        placed, aw, bw, ak, bk = [], [], [], [], []
        for o in grp:
            t = overlay_tiling(o, target, context)
            if t is None:
                return None
            row = col = 0
            if t.k:
                t = dataclasses.replace(t, rk=off_k % t.pr, rn=off_n % t.pc)
                off_k += (t.k // t.kblock) % t.pr  # larger parts, in blocks
                off_n += (t.n // t.nblock) % t.pc
                if (t.kblock > 1 or t.nblock > 1) and (t.pr < R or t.pc < C):
                    row, col = _emptiest_band(weights + layer_w + kv_hint, t.pr, t.pc)
            else:
                t = dataclasses.replace(t, rn=off_n % t.cols_per_head)
                off_n += t.hd % t.cols_per_head
            placed.append((o, t, row, col))
            a, b, is_kv = _overlay_vectors(t, R, C, col=col, row=row)
            if not is_kv and (t.kblock > 1 or t.nblock > 1):
                layer_w += np.outer(a, b)
            (ak if is_kv else aw).append(a)
            (bk if is_kv else bw).append(b)
        # This layer's bytes on every core: a sum of outer products, one matrix product.
        add_w = np.stack(aw, 1) @ np.stack(bw) if aw else 0.0
        add_k = np.stack(ak, 1) @ np.stack(bk) if ak else 0.0
        positions = max((t.positions for _, t, *_ in placed if not t.k), default=0)
        buf = max(t.buffer_bytes for _, t, *_ in placed)
        total = weights + add_w + positions * (kv + add_k)
        if total.max() + max(buffers, buf) > target.core_budget:
            if not wafers[-1]:
                return None
            loads.append([weights, kv, buffers])
            wafers.append([])
            weights, kv, buffers = np.zeros((R, C)), np.zeros((R, C)), 0
        wafers[-1].extend(placed)
        weights, kv, buffers = weights + add_w, kv + add_k, max(buffers, buf)
        layer_w[:] = 0
    loads.append([weights, kv, buffers])
    regions: dict[str, Region] = {}
    for w, items in enumerate(wafers):
        first = items[0][0].name
        for o, t, row, col in items:
            regions[o.name] = Region(o.name, w, row, col,
                                     dataclasses.replace(t, share=len(items)),
                                     group=None if o.name == first else first)
    layers = [sorted({o.layer for o, *_ in items if o.layer is not None}) for items in wafers]
    return Packing(regions, layers, len(wafers) * target.cores, share=0,
                   overlay_loads=loads)


def _kv_hint(g: Graph, target: Target, context: int) -> np.ndarray:
    """Bytes per core of every layer's KV cache at `context` over the whole wafer (the
    overlay's attention tilings), to steer packed bands to the cores the cache leaves
    free (a guide for placement only; what fits is checked on the real loads)."""
    from compiler.partition import overlay_tiling

    out = np.zeros((target.rows, target.cols))
    for o in g.ops:
        if o.kind == "attention":
            t = overlay_tiling(o, target, context)
            if t is not None:
                a, b, _ = _overlay_vectors(t, target.rows, target.cols)
                out += t.positions * np.outer(a, b)
    return out


def _emptiest_band(load: np.ndarray, pr: int, pc: int) -> tuple[int, int]:
    """Top-left (row, col) of the pr x pc rectangle whose fullest core holds the fewest
    bytes of `load` (then the fewest in all), among those at multiples of its height and
    width (and flush with the far edges)."""
    R, C = load.shape
    rows = sorted(set(range(0, R - pr + 1, pr)) | {R - pr})
    cols = sorted(set(range(0, C - pc + 1, pc)) | {C - pc})
    best = min((load[r:r + pr, c:c + pc].max(), load[r:r + pr, c:c + pc].sum(), r, c)
               for r in rows for c in cols)
    return best[2], best[3]


def overlay_max_context(p: Packing, target: Target) -> int:
    """Largest context the overlaid plan's cores hold with its layer split kept: every
    row of cores holds ceil(context / rows) positions of each layer's cache."""
    best = None
    for weights, kv, buffers in p.overlay_loads:
        has_kv = kv > 0
        if not has_kv.any():
            continue
        room = (target.core_budget - buffers - weights[has_kv]) / kv[has_kv]
        per_row = int(np.floor(room.min()))
        best = per_row if best is None else min(best, per_row)
    return max(best or 0, 0) * target.rows


def mapping_name(share: int) -> str:
    """How a plan with `share` layers per set of regions maps the model."""
    if share == 0:
        return "every op over the whole wafer"
    return f"{share} layer(s) per set of regions"


def share_candidates(n_layers: int) -> list[int]:
    """Layers per shared region set to try: 1, 2, 4, ... and all layers."""
    out = {1, n_layers}
    m = 2
    while m < n_layers:
        out.add(m)
        m *= 2
    return sorted(out)


# ---- refinement -------------------------------------------------------------------------

def anchor(regions: dict[str, Region], name: str) -> str:
    """The op that owns the rectangle `name` runs on (itself unless it shares one)."""
    return regions[name].group or name


def handoff_pairs(g: Graph, host: dict[str, str], regions: dict[str, Region]):
    """(op, input op name, source anchor, destination anchor) for every input that crosses
    from one rectangle to another."""
    for o in g.ops:
        for i in o.inputs:
            src, dst = anchor(regions, host[i]), anchor(regions, host[o.name])
            if src != dst:
                yield o, i, src, dst


def flows(g: Graph, host: dict[str, str], regions: dict[str, Region]
          ) -> list[tuple[str, str, int]]:
    """(source rectangle, destination rectangle, bytes per token) of every op-to-op
    hand-off between different rectangles, each named by its anchor op."""
    by_name = {o.name: o for o in g.ops}
    return [(src, dst, by_name[i].out_bytes)
            for _, i, src, dst in handoff_pairs(g, host, regions)]


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
    origin = {k: (r.row, r.col) for k, r in regions.items()}
    before = flow_cost(regions, fl)
    classes: dict[tuple, list[str]] = defaultdict(list)
    for name, r in regions.items():
        if r.group is None:  # move rectangles by their anchors; sharers follow below
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

    n_moves = moves_per_region * sum(len(c) for c in swappable)
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
    _follow(regions, origin)
    return regions, before, flow_cost(regions, fl)


def _follow(regions: dict[str, Region], origin: dict[str, tuple[int, int]]) -> None:
    """Move every sharing region by the displacement of its anchor."""
    for name, r in regions.items():
        if r.group is not None:
            a = regions[r.group]
            dr, dc = a.row - origin[r.group][0], a.col - origin[r.group][1]
            r.row, r.col = origin[name][0] + dr, origin[name][1] + dc
