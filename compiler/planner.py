"""The partition planner: enumerate mappings, predict each, keep the fastest that fits.

Like a matmul planner that enumerates splits and keeps the fewest estimated cycles under
a per-tile memory bound, it tries:

  share   layers per set of regions: 1 (every op of every layer on cores of its own, tiles
          as large as the budget allows) up to all layers (each op's region holds that op
          of every layer, so each matrix is spread over share times more cores); and
          share 0, every op of every layer overlaid on the whole wafer (WaferLLM's mapping:
          each matrix over all cores, layers one after another on the same cores);
  band    the rows of each region (the K split of MeshGEMV, the position split of
          attention), hence the region shapes;
  wafers  each candidate's pipeline split: runs of layers fill a wafer in order before
          the next starts, and none straddles two wafers.

Each candidate is packed (memory), then priced with the cost model at the plan's context
with hand-offs between region centres; the fastest is routed and refined afterwards.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from compiler import cost
from compiler.ir import Graph
from compiler.place import Packing, hosts, mapping_name, pack, pack_overlay, share_candidates
from compiler.target import Target


@dataclasses.dataclass
class Candidate:
    share: int
    band: int
    packing: Packing
    seconds: float  # predicted decode step at the plan's context

    @property
    def wafers(self) -> int:
        return len(self.packing.wafer_layers)

    def describe(self) -> dict:
        cores = sum(r.tiling.cores for r in self.packing.regions.values() if r.group is None)
        return {"layers_per_region": self.share, "mapping": mapping_name(self.share),
                "band_rows": self.band,
                "wafers": self.wafers, "cores": int(cores),
                "decode_tokens_per_s": 1.0 / self.seconds if self.seconds else 0.0}


def band_choices(rows: int) -> list[int]:
    """Region heights to try: rows // m for m = 1..16, then a few shorter ones."""
    out = {max(1, rows // m) for m in range(1, 17)}
    out |= {h for h in (64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1) if h <= rows}
    return sorted(out, reverse=True)


def candidates(g: Graph, target: Target, context: int, max_wafers: int, cfg,
               only_share: int | None = None) -> list[Candidate]:
    """Every (share, band) mapping that fits `max_wafers`, fastest first (only those with
    `only_share` layers per region when given)."""
    host = hosts(g)
    act = np.dtype(cfg.dtype).itemsize
    layers = max(len(g.layers), 1)
    out: list[Candidate] = []
    shares = share_candidates(layers) if only_share is None else [only_share]
    tries = [(share, band) for share in shares for band in band_choices(target.rows)
             if share] + ([(0, target.rows)] if only_share in (None, 0) else [])
    for share, band in tries:
        p = (pack_overlay(g, target, context) if share == 0
             else pack(g, target, band, context, share))
        if p is None or len(p.wafer_layers) > max_wafers:
            continue
        seconds = cost.step(g, host, p.regions, target, act, context).seconds(target)
        out.append(Candidate(share, band, p, seconds))
    out.sort(key=lambda c: (c.seconds, c.wafers, c.packing.span))
    return out


def smallest(g: Graph, target: Target, context: int) -> tuple[int, int, int] | None:
    """(share, band, wafers) of the mapping needing the fewest wafers when any number may
    be used; None if no mapping fits at all."""
    best = None
    p = pack_overlay(g, target, context)
    if p is not None:
        best = (0, target.rows, len(p.wafer_layers))
    for share in share_candidates(max(len(g.layers), 1)):
        for band in band_choices(target.rows):
            p = pack(g, target, band, context, share)
            if p is not None and (best is None or len(p.wafer_layers) < best[2]):
                best = (share, band, len(p.wafer_layers))
    return best
