"""What a plan puts on each core: `core` (one core's tiles, hosted ops and bytes),
`core_bytes` (bytes in use on every core) and `op_placement` (an op's region and host)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from compiler.ir import Op
from compiler.place import Region
from compiler.plan import Plan


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


def op_placement(plan: Plan, name: str) -> OpPlacement:
    """The op `name`, the op whose region runs it, and that region."""
    op = plan.graph.op(name)
    return OpPlacement(op=op, host=plan.host[name], region=plan.regions[plan.host[name]])


def _hosted(plan: Plan) -> dict[str, list[Op]]:
    """Region name -> the ops without a region of their own that run on it."""
    out: dict[str, list[Op]] = {}
    for o in plan.graph.ops:
        if o.name not in plan.regions:
            out.setdefault(plan.host[o.name], []).append(o)
    return out


def _hosted_bytes(plan: Plan, region: str, ops: list[Op]) -> int:
    """Bytes per core of the small parameters (norm scales) of `ops`, spread over the
    cores of `region`."""
    cores = plan.regions[region].tiling.cores
    total = 0
    for o in ops:
        for p in o.params:
            info = plan.graph.params[p]
            total += -(-info.size // cores) * np.dtype(info.dtype).itemsize
    return total


def core(plan: Plan, row: int, col: int, wafer: int = 0) -> CoreInfo:
    """The tiles (K and N ranges), hosted vector ops and bytes of one core."""
    t = plan.target
    if not (0 <= wafer < plan.wafers and 0 <= row < t.rows and 0 <= col < t.cols):
        raise IndexError(f"core ({row}, {col}) on wafer {wafer} is outside the plan's "
                         f"{plan.wafers} wafer(s) of {t.rows} x {t.cols}")
    hosted = _hosted(plan)
    tiles, runs, extra = [], [], 0
    for name, r in plan.regions.items():
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
        extra += _hosted_bytes(plan, name, ops)
    return CoreInfo(wafer, row, col, tuple(tiles), tuple(runs),
                    sum(x.bytes for x in tiles) + extra)


def core_bytes(plan: Plan) -> np.ndarray:
    """Bytes in use on every core, (wafers, rows, cols): each rectangle's tilings (and
    hosted parameters) added up in one matrix product of their byte terms."""
    out = np.zeros((plan.wafers, plan.target.rows, plan.target.cols), np.int64)
    hosted = _hosted(plan)
    terms: dict[tuple, list] = defaultdict(list)  # rectangle -> [(row, column factor)]
    for name, r in plan.regions.items():
        rect = terms[(r.wafer, r.row, r.col, r.rows, r.cols)]
        rect += r.tiling.byte_terms()
        extra = _hosted_bytes(plan, name, hosted.get(name, []))
        if extra:
            rect.append((np.ones(r.rows, np.int64), np.full(r.cols, extra, np.int64)))
    for (w, r0, c0, nr, nc), rect in terms.items():
        rows = np.stack([a for a, _ in rect], 1).astype(np.float64)
        cols = np.stack([b for _, b in rect]).astype(np.float64)
        # Exact: every product and sum is an integer far below 2**53.
        out[w, r0:r0 + nr, c0:c0 + nc] += np.rint(rows @ cols).astype(np.int64)
    return out
