"""Routing: every data flow of a plan on dimension-ordered (X then Y) routes.

Flows per token:
  broadcast  each matvec row's K-slice of the input vector, multicast along the row
  reduce     each matvec column's partial sums, up the column (K-tree, K = 2)
  attention  the query multicast over a head's cores and the softmax partials reduced back
  hand-off   an op's output to the next op's region (between layers too), routed X then Y
             between region centres over as many parallel lanes as the source has columns
             and the destination input rows (the load below is one lane's); between
             wafers, to the east edge, over the wafer link, and on from the west edge

Link loads are kept per link as bytes per token (horizontal links (W, R, C-1), vertical
(W, R-1, C)), filled with 2-D difference arrays so a 900K-core wafer costs a few array
passes. Routes per core count the distinct routes each router must hold: 2 per core of a
matvec region (its row and its column), 2 per attention core, 1 per hand-off route it
lies on. Layers that share regions reuse the same routes. Where a core holds more routes
than the target allows, routes through it are relayed in software there: each such core
on a hand-off's path adds a routing stage to it (WaferLLM's PLMR "R").

`route` takes the placement itself (graph, hosts, regions, target), so it serves plans
and candidates alike; `route_plan` routes a compiler.plan.Plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from compiler.ir import Graph, Op
from compiler.place import Region, handoff_pairs
from compiler.target import Target


@dataclasses.dataclass
class Routing:
    h_load: np.ndarray  # (W, R, C-1) bytes per token on the link (r, c) <-> (r, c+1)
    v_load: np.ndarray  # (W, R-1, C) bytes per token on the link (r, c) <-> (r+1, c)
    paths: np.ndarray  # (W, R, C) routes each core's router holds
    handoffs: list[dict]  # per hand-off: src, dst, bytes, lanes, hops, relays, wafers, path
    limit: int  # routes a router can hold

    @property
    def max_link(self) -> tuple[float, tuple[int, int, int, str]]:
        """(bytes per token, (wafer, row, col, 'h' or 'v')) of the most loaded link."""
        h = np.unravel_index(np.argmax(self.h_load), self.h_load.shape) if self.h_load.size \
            else None
        v = np.unravel_index(np.argmax(self.v_load), self.v_load.shape) if self.v_load.size \
            else None
        hb = float(self.h_load[h]) if h is not None else -1.0
        vb = float(self.v_load[v]) if v is not None else -1.0
        if hb >= vb:
            return hb, (int(h[0]), int(h[1]), int(h[2]), "h")
        return vb, (int(v[0]), int(v[1]), int(v[2]), "v")

    @property
    def cores_over_limit(self) -> int:
        return int((self.paths > self.limit).sum())

    @property
    def relay_stages(self) -> int:
        return int(sum(h["relays"] for h in self.handoffs))

    def summary(self) -> dict:
        load, where = self.max_link
        return {"max_link_bytes_per_token": load, "max_link": list(where),
                "max_routes_per_core": int(self.paths.max()) if self.paths.size else 0,
                "route_limit": self.limit, "cores_over_route_limit": self.cores_over_limit,
                "relay_stages": self.relay_stages, "handoffs": len(self.handoffs)}


class _Rect:
    """Difference-array accumulator for rectangle additions over (W, R, C)."""

    def __init__(self, w, r, c):
        self.d = np.zeros((w, r + 1, c + 1), np.float64)

    def add(self, w, r0, r1, c0, c1, value):  # rows [r0, r1), cols [c0, c1)
        if r1 <= r0 or c1 <= c0 or value == 0:
            return
        d = self.d[w]
        d[r0, c0] += value
        d[r0, c1] -= value
        d[r1, c0] -= value
        d[r1, c1] += value

    def result(self):
        return np.cumsum(np.cumsum(self.d, axis=1), axis=2)[:, :-1, :-1]


def _centre(r) -> tuple[int, int]:
    return r.row + r.rows // 2, r.col + r.cols // 2


def lanes(regions: dict[str, Region], host: dict[str, str], op: Op, side: str) -> int:
    """Parallel routes an op's data enters ("in") or leaves ("out") its region by: a
    matvec's input enters along its rows, every output leaves along its region's columns."""
    tl = regions[host[op.name]].tiling
    return tl.pr if side == "in" and op.kind == "matvec" else tl.pc


def route(g: Graph, host: dict[str, str], regions: dict[str, Region], target: Target,
          wafers: int, act: int) -> Routing:
    """Route every flow of the placement over `wafers` wafers of `target` (activations of
    `act` bytes). Each hand-off's `path` lists its corners as (wafer, row, col): from the
    source region's centre along the row, then the column, to the destination's centre;
    between wafers, along the row to the east edge, over the wafer link, and from the west
    edge along the destination's row."""
    t = target
    W, R, C = wafers, t.rows, t.cols
    h = _Rect(W, R, max(C - 1, 0))
    v = _Rect(W, max(R - 1, 0), C)
    paths = _Rect(W, R, C)
    seen_rects = set()
    for name, reg in regions.items():
        op = g.op(name)
        tl = reg.tiling
        r0, c0 = reg.row, reg.col
        if op.kind == "attention":
            n, k, hd = op.heads
            vec = (n // k) * hd * act
            h.add(reg.wafer, r0, r0 + tl.pr, c0, c0 + tl.pc - 1, 2 * vec)
            v.add(reg.wafer, r0, r0 + tl.pr - 1, c0, c0 + tl.pc, 2 * vec)
        elif op.is_tiled:
            h.add(reg.wafer, r0, r0 + tl.pr, c0, c0 + tl.pc - 1, tl.tk * act)  # broadcast
            v.add(reg.wafer, r0, r0 + tl.pr - 1, c0, c0 + tl.pc, tl.tn * act)  # reduce
        key = (reg.wafer, r0, c0, tl.pr, tl.pc)
        if key not in seen_rects:  # sharers reuse the rectangle's routes
            seen_rects.add(key)
            paths.add(reg.wafer, r0, r0 + tl.pr, c0, c0 + tl.pc, 2)

    segments = []  # (flow index, wafer, r0, r1, c0, c1) of every hand-off path piece
    handoffs = []
    routes_seen = set()
    by_name = {o.name: o for o in g.ops}
    for o, i, sa, da in handoff_pairs(g, host, regions):
        src, dst = regions[sa], regions[da]
        n_lanes = min(lanes(regions, host, by_name[i], "out"), lanes(regions, host, o, "in"))
        nbytes = by_name[i].out_bytes / n_lanes  # on each of the parallel routes
        (rs, cs), (rd, cd) = _centre(src), _centre(dst)
        if src.wafer == dst.wafer:
            pieces = [(src.wafer, rs, rs + 1, min(cs, cd), max(cs, cd) + 1),
                      (src.wafer, min(rs, rd), max(rs, rd) + 1, cd, cd + 1)]
            hops = abs(rs - rd) + abs(cs - cd)
            path = [(src.wafer, rs, cs), (src.wafer, rs, cd), (dst.wafer, rd, cd)]
        else:  # east edge of this wafer, the wafer link, west edge of the next
            pieces = [(src.wafer, rs, rs + 1, cs, C), (dst.wafer, rd, rd + 1, 0, cd + 1)]
            hops = (C - 1 - cs) + cd
            path = [(src.wafer, rs, cs), (src.wafer, rs, C - 1), (dst.wafer, rd, 0),
                    (dst.wafer, rd, cd)]
        for w, a, b, c, d in pieces:
            if b - a == 1:
                h.add(w, a, b, c, d - 1, nbytes)
            else:
                v.add(w, a, b - 1, c, d, nbytes)
        key = (sa, da)
        if key not in routes_seen:
            routes_seen.add(key)
            for w, a, b, c, d in pieces:
                paths.add(w, a, b, c, d, 1)
        idx = len(handoffs)
        segments += [(idx, *p) for p in pieces]
        handoffs.append({"src": sa, "dst": da, "bytes": int(by_name[i].out_bytes),
                         "lanes": int(n_lanes), "hops": int(hops),
                         "relays": 0, "wafers": int(dst.wafer - src.wafer),
                         "path": [tuple(int(x) for x in p) for p in path]})
    path_counts = np.rint(paths.result()).astype(np.int64)
    over = path_counts > t.routing_paths
    if over.any():
        for idx, w, a, b, c, d in segments:
            handoffs[idx]["relays"] += int(over[w, a:b, c:d].sum())
    return Routing(h.result(), v.result(), path_counts, handoffs, t.routing_paths)


def route_plan(plan) -> Routing:
    """Every flow of a compiler.plan.Plan routed."""
    return route(plan.graph, plan.host, plan.regions, plan.target, plan.wafers,
                 np.dtype(plan.cfg.dtype).itemsize)


def routing_of(plan) -> Routing:
    """A plan's routing: the one it holds, or routed now if it holds none."""
    return plan.routing if plan.routing is not None else route_plan(plan)
