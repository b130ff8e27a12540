"""`check_plan`: the invariants of a compiled plan; raises CompilerError naming the first
one broken (`compile` checks every plan it returns).

  grid      every region lies inside the target's grid, on one of the plan's wafers, and
            the plan uses no more wafers than the target has
  cores     rectangles of their own never overlap; a region sharing another's cores
            (`group`) starts at that region's top-left core on its wafer (on the
            whole-wafer overlay, anywhere on that wafer: a matrix of packed weights with
            fewer blocks than the wafer has rows or columns sits on a band of them)
  weights   every weight element is on exactly one core: each weight matrix is held by one
            region, whose tiling's K split covers every row once and N split every column
            once; packed weights are split only between whole blocks (with their
            scales) and counted at their format's bytes per block; every op runs on a
            region the plan has
  cache     every attention region holds the plan's context
  SRAM      no core holds more bytes than the target's budget per core
  flows     every hand-off between regions is routed: its route starts on a core of the
            source region, ends on a core of the destination, and moves along a row or a
            column of the grid, or over a wafer link from an east edge to a west edge
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from compiler.cores import core_bytes
from compiler.ir import CompilerError
from compiler.place import Region, handoff_pairs
from compiler.plan import Plan


def check_plan(plan: Plan) -> None:
    """Raise CompilerError if `plan` breaks one of the invariants above."""
    _check_grid(plan)
    _check_cores(plan)
    _check_weights(plan)
    _check_cache(plan)
    _check_sram(plan)
    _check_flows(plan)


def _rect(r: Region) -> str:
    return (f"rows {r.row}-{r.row + r.rows - 1}, cols {r.col}-{r.col + r.cols - 1} "
            f"of wafer {r.wafer}")


def _check_grid(plan: Plan) -> None:
    t = plan.target
    if plan.wafers > t.wafers:
        raise CompilerError(f"the plan uses {plan.wafers} wafer(s), but {t.name} has "
                            f"{t.wafers}")
    for name, r in plan.regions.items():
        if not 0 <= r.wafer < plan.wafers:
            raise CompilerError(f"region {name} is on wafer {r.wafer}, but the plan has "
                                f"wafers 0-{plan.wafers - 1}")
        if (r.rows < 1 or r.cols < 1 or r.row < 0 or r.col < 0
                or r.row + r.rows > t.rows or r.col + r.cols > t.cols):
            raise CompilerError(f"region {name} ({_rect(r)}) lies outside the "
                                f"{t.rows} x {t.cols} grid of {t.name}")


def _check_cores(plan: Plan) -> None:
    t = plan.target
    members: dict[str, list[Region]] = defaultdict(list)
    for name, r in plan.regions.items():
        if r.group is None:
            members[name].append(r)
            continue
        a = plan.regions.get(r.group)
        if a is None or a.group is not None:
            raise CompilerError(f"region {name} shares the cores of {r.group!r}, which is "
                                "not a region of its own")
        overlay_band = plan.share == 0 and a.wafer == r.wafer
        if (a.wafer, a.row, a.col) != (r.wafer, r.row, r.col) and not overlay_band:
            raise CompilerError(f"region {name} ({_rect(r)}) shares the cores of "
                                f"{r.group} ({_rect(a)}) but does not start at its top-left")
        members[r.group].append(r)
    owners = np.zeros((plan.wafers, t.rows, t.cols), np.int32)
    for regions in members.values():  # each set of shared cores counts once
        rects = {(r.wafer, r.row, r.col, r.rows, r.cols) for r in regions}
        w = regions[0].wafer
        mask = np.zeros((t.rows, t.cols), bool) if len(rects) > 1 else None
        for _, r0, c0, nr, nc in rects:
            if mask is None:
                owners[w, r0:r0 + nr, c0:c0 + nc] += 1
            else:
                mask[r0:r0 + nr, c0:c0 + nc] = True
        if mask is not None:
            owners[w] += mask
    if owners.max(initial=0) > 1:
        w, row, col = (int(x) for x in np.argwhere(owners > 1)[0])
        names = sorted(n for n, r in plan.regions.items()
                       if r.group is None and r.wafer == w and r.contains(row, col))
        raise CompilerError(f"regions {', '.join(names)} overlap on core ({row}, {col}) of "
                            f"wafer {w}")


def _check_axis(name: str, weight: str, what: str, bounds: np.ndarray, total: int) -> None:
    """The parts [bounds[i], bounds[i+1]) of one axis of `weight` (its `total` rows or
    columns) hold every item exactly once."""
    lo, hi = bounds[:-1], bounds[1:]
    keep = hi > lo
    if np.any(keep & ((lo < 0) | (hi > total))):
        raise CompilerError(f"region {name} holds {what} outside the {total} of weight "
                            f"{weight}")
    d = np.zeros(total + 1, np.int64)
    np.add.at(d, lo[keep], 1)
    np.add.at(d, hi[keep], -1)
    held = np.cumsum(d)[:-1]
    bad = np.flatnonzero(held != 1)
    if bad.size:
        i = int(bad[0])
        raise CompilerError(f"weight {weight}: {what[:-1]} {i} is in {int(held[i])} parts of "
                            f"region {name}'s split, not exactly one ({bad.size} of its "
                            f"{total} {what} are not)")


def _check_weights(plan: Plan) -> None:
    g = plan.graph
    by_name = {o.name: o for o in g.ops}
    held: dict[str, list[str]] = defaultdict(list)  # weight -> regions holding it
    for name in plan.regions:
        op = by_name.get(name)
        if op is None:
            raise CompilerError(f"region {name} is not an op of the decode step")
        if op.kind == "attention":
            continue
        if op.weight is None:
            raise CompilerError(f"region {name}: a {op.kind} op holds no weight or cache")
        held[op.weight].append(name)
    for o in g.ops:
        host = plan.host.get(o.name)
        if host not in plan.regions:
            raise CompilerError(f"op {o.name} runs on {host!r}, which is not a region of "
                                "the plan")
        if (o.is_tiled or o.kind == "attention") and o.name not in plan.regions:
            raise CompilerError(f"op {o.name} has no region")
        if not o.is_tiled:
            continue
        names = held[o.weight]
        if names != [o.name]:
            raise CompilerError(f"weight {o.weight} is held by {len(names)} regions "
                                f"({', '.join(names)}): each element must be on exactly "
                                "one core")
        tl = plan.regions[o.name].tiling
        _check_axis(o.name, o.weight, "rows", tl.k_bounds(), o.k)
        _check_axis(o.name, o.weight, "columns", tl.n_bounds(), o.n)
        _check_blocks(o, tl)


def _check_blocks(o, tl) -> None:
    """The tiling stores `o`'s weight in its format: the block sizes and bytes agree, and
    every split point falls between whole blocks."""
    kb, nb, nbytes = o.blocks
    if (tl.kblock, tl.nblock, tl.wbytes) != (kb, nb, nbytes):
        raise CompilerError(f"region {o.name} stores weight {o.weight} as blocks of "
                            f"{tl.kblock} x {tl.nblock} weights in {tl.wbytes} bytes, but its "
                            f"format {o.weight_dtype} has {kb} x {nb} in {nbytes}")
    for what, b, unit in (("row", tl.k_bounds(), kb), ("column", tl.n_bounds(), nb)):
        bad = b[b % unit != 0]
        if bad.size:
            raise CompilerError(f"region {o.name} splits weight {o.weight} at {what} "
                                f"{int(bad[0])}, inside a {unit}-weight {o.weight_dtype} block")


def _check_cache(plan: Plan) -> None:
    for o in plan.graph.ops:
        if o.kind == "attention":
            tl = plan.regions[o.name].tiling
            if tl.positions * tl.pr < plan.context:
                raise CompilerError(f"attention {o.name} holds {tl.positions * tl.pr:,} "
                                    f"cache positions, fewer than the plan's context "
                                    f"{plan.context:,}")


def _check_sram(plan: Plan) -> None:
    t = plan.target
    used = core_bytes(plan)
    if used.size and used.max() > t.core_budget:
        w, row, col = (int(x) for x in np.argwhere(used > t.core_budget)[0])
        raise CompilerError(f"core ({row}, {col}) of wafer {w} holds {int(used[w, row, col]):,} "
                            f"bytes, over the {t.core_budget:,}-byte budget per core of "
                            f"{t.name} ({int((used > t.core_budget).sum()):,} cores are over)")


def _check_flows(plan: Plan) -> None:
    rt = plan.routing
    if rt is None:
        raise CompilerError("the plan is not routed (its routing is None)")
    routes: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for h in rt.handoffs:
        routes[(h["src"], h["dst"])].append(h)
    done = set()
    for o, i, sa, da in handoff_pairs(plan.graph, plan.host, plan.regions):
        if (sa, da) in done:
            continue
        if not routes.get((sa, da)):
            raise CompilerError(f"the flow {i} -> {o.name} (region {sa} to region {da}) "
                                "is not routed")
        for h in routes[(sa, da)]:
            _check_path(plan, h.get("path") or [], sa, da)
        done.add((sa, da))


def _check_path(plan: Plan, path: list, sa: str, da: str) -> None:
    t = plan.target
    where = f"the route {sa} -> {da}"
    if not path:
        raise CompilerError(f"{where} has no path")
    for w, r, c in path:
        if not (0 <= w < plan.wafers and 0 <= r < t.rows and 0 <= c < t.cols):
            raise CompilerError(f"{where} passes core ({r}, {c}) of wafer {w}, outside the "
                                f"plan's {plan.wafers} wafer(s) of {t.rows} x {t.cols}")
    for (w, r, c), name, end in ((path[0], sa, "starts"), (path[-1], da, "ends")):
        reg = plan.regions[name]
        if not (reg.wafer == w and reg.contains(r, c)):
            raise CompilerError(f"{where} {end} at core ({r}, {c}) of wafer {w}, outside "
                                f"region {name} ({_rect(reg)})")
    for (w0, r0, c0), (w1, r1, c1) in zip(path, path[1:]):
        straight = w0 == w1 and (r0 == r1 or c0 == c1)
        link = w0 != w1 and c0 == t.cols - 1 and c1 == 0
        if not (straight or link):
            raise CompilerError(f"{where} jumps from core ({r0}, {c0}) of wafer {w0} to "
                                f"({r1}, {c1}) of wafer {w1}: neither along a row or column "
                                "nor over a wafer link")
