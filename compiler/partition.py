"""Partitioning: how many cores each op needs and what each core holds.

MeshGEMV (WaferLLM, OSDI'25): a (K, N) weight is cut into a pr x pc grid of tiles, one per
core. The input vector is split along K over the pr rows (and replicated along the pc
columns); each core multiplies its K-slice by its tile; the pr partial sums of each
column are then reduced along K. Dimensions that do not divide are split into balanced
uneven parts (sizes differ by at most one), so no weight is padded or dropped; each core's
budget is checked against the largest tile.

Packed weights (q8_0, q4_0, q4_1: 32 weights with an f16 scale, and an f16 minimum for
q4_1) are split in whole blocks: a matvec's K only at multiples of 32 (a boundary inside a
block would leave part of it without its scale), a lookup table's rows (its D, the axis
its blocks run along) likewise; so a K of 4,096 spreads over at most 128 core rows. The
parts are balanced in blocks (they differ by at most one block), and a core's bytes are
its blocks times the block's bytes, scales included.

A core's budget is its SRAM minus the target's reserve; in it go the tile, the input
slice and the partial-sum buffer (f32), or for attention its share of the KV cache.

The KV cache of each layer is spread evenly over that layer's attention cores, as in
WaferLLM's shift-based cache: a new token's keys and values enter at one edge and every
row of cores passes its oldest entries on, so all rows hold the same number of positions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from compiler.ir import Op

ACC_BYTES = 4  # activations and partial sums are f32 on the cores


def bounds(total: int, parts: int, rot: int = 0, unit: int = 1) -> np.ndarray:
    """Balanced split points of `total` items into `parts`: part i is [b[i], b[i+1]).
    Parts differ by at most one item, so nothing is padded and nothing is lost. The
    (total % parts) larger parts start at part `rot`, so ops overlaid on the same cores
    can put their larger parts on different cores. With `unit` > 1 (packed weights'
    block) the items are split in whole units of that many: every split point is a
    multiple of `unit`, which must divide `total`."""
    units = total // unit
    sizes = np.full(parts, units // parts, np.int64)
    sizes[(np.arange(parts) - rot) % parts < units % parts] += 1
    return np.concatenate([[0], np.cumsum(sizes)]) * unit


def split_index(total: int, parts: int, width: int, rot: int = 0, unit: int = 1
                ) -> np.ndarray:
    """(parts, width) indices of each part's items; slots past a short part hold `total`
    (an index one past the end, which callers map to zero)."""
    b = bounds(total, parts, rot, unit)
    ar = np.arange(width, dtype=np.int64)
    idx = b[:-1, None] + ar[None, :]
    return np.where(ar[None, :] < np.diff(b)[:, None], idx, total)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How one op is cut over a pr x pc rectangle of cores (balanced, uneven by <= 1)."""

    pr: int  # Core rows (K is split over them for a matvec; positions for attention).
    pc: int  # Core columns (N is split over them).
    k: int = 0  # matvec: K, the contracted length.
    n: int = 0  # matvec: N, the output length.
    wbytes: int = 0  # matvec: bytes per weight block (per element when dense).
    positions: int = 0  # attention: cache positions per core row (of one kv head).
    dh: int = 0  # attention: most head dimensions on one core.
    hd: int = 0  # attention: head dimension H.
    kv_bytes: int = 0  # attention: bytes per position per dimension (key and value).
    buffers: int = 0  # attention: working buffers per core.
    share: int = 1  # ops that share this region (and its buffers)
    rk: int = 0  # row where K's larger parts start (see bounds)
    rn: int = 0  # column where N's larger parts start
    kblock: int = 1  # matvec: weights per block along K (32 when packed, else 1)
    nblock: int = 1  # lookup table: weights per block along N (32 when packed, else 1)

    def k_bounds(self) -> np.ndarray:
        return bounds(self.k, self.pr, self.rk, self.kblock)

    def n_bounds(self) -> np.ndarray:
        return bounds(self.n, self.pc, self.rn, self.nblock)

    def k_index(self) -> np.ndarray:
        return split_index(self.k, self.pr, self.tk, self.rk, self.kblock)

    def n_index(self) -> np.ndarray:
        return split_index(self.n, self.pc, self.tn, self.rn, self.nblock)

    def weight_bytes(self, lk, ln):
        """Bytes of an lk x ln tile (whole blocks when packed, scales included)."""
        return (lk // self.kblock) * (ln // self.nblock) * self.wbytes

    @property
    def cores(self) -> int:
        return self.pr * self.pc

    @property
    def tk(self) -> int:
        """Most K elements on one core (whole blocks when packed)."""
        return -(-(self.k // self.kblock) // self.pr) * self.kblock if self.k else 0

    @property
    def tn(self) -> int:
        """Most N elements on one core (whole blocks when packed)."""
        return -(-(self.n // self.nblock) // self.pc) * self.nblock if self.n else 0

    @property
    def bytes_per_core(self) -> int:
        """Bytes this op holds on the fullest core of its region (its weights or cache
        share, and its part of the working buffers, which the layers sharing a region
        use in turn and so split between them)."""
        if self.k:
            return self.weight_bytes(self.tk, self.tn) + self._buffers(self.tk, self.tn)
        return self.positions * self.dh * self.kv_bytes + -(-self.buffers // self.share)

    @property
    def buffer_bytes(self) -> int:
        """This op's working buffers on its fullest core (before splitting by share)."""
        if self.k:
            return ACC_BYTES * (self.tk + self.tn)
        return self.buffers

    def _buffers(self, tk, tn):
        return -(-ACC_BYTES * (tk + tn) // self.share)

    def core_bytes(self) -> np.ndarray:
        """Bytes this op holds on every core of its region, (pr, pc)."""
        if self.k:
            lk = np.diff(self.k_bounds())[:, None]
            ln = np.diff(self.n_bounds())[None, :]
            return self.weight_bytes(lk, ln) + self._buffers(lk, ln)
        heads = self.pc // max(self.cols_per_head, 1)
        dims = np.tile(np.diff(bounds(self.hd, self.cols_per_head, self.rn)), heads)
        return (self.positions * self.kv_bytes * dims[None, :]
                + -(-self.buffers // self.share)).repeat(self.pr, axis=0)

    def byte_terms(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """core_bytes() as a sum of outer products (row factor, column factor), so the
        bytes of many tilings over the same cores add up in one matrix product. Parts
        differ by at most one (block), so the buffers' rounded share takes at most four
        values."""
        ones_r, ones_c = np.ones(self.pr, np.int64), np.ones(self.pc, np.int64)
        if self.k:
            kb, nb = self.kblock, self.nblock
            lk, ln = np.diff(self.k_bounds()), np.diff(self.n_bounds())
            ia, ib = (lk - lk.min()) // kb, (ln - ln.min()) // nb  # 1: the larger part
            f00, f10, f01, f11 = (int(self._buffers(lk.min() + x * kb, ln.min() + y * nb))
                                  for x, y in ((0, 0), (1, 0), (0, 1), (1, 1)))
            return [(lk // kb * self.wbytes, ln // nb), (ones_r, ones_c * f00),
                    (ia * (f10 - f00), ones_c),
                    (ones_r, ib * (f01 - f00)), (ia, ib * (f11 - f10 - f01 + f00))]
        return [(ones_r, self.core_bytes()[0])]  # every row of cores holds the same

    @property
    def cols_per_head(self) -> int:
        """attention: columns of one kv head (its dimensions are split over them)."""
        return -(-self.hd // self.dh) if self.dh else 0


def matvec_tiling(op: Op, rows: int, budget: int, share: int = 1) -> Tiling | None:
    """The narrowest tiling of `op` over at most `rows` core rows, its region holding the
    same op of `share` layers; None if even one column of K-slices exceeds the budget.
    Packed weights are cut in whole blocks (see the module's docstring)."""
    kb, nb, wbytes = op.blocks
    pr = min(rows, op.k // kb)
    tk = -(-(op.k // kb) // pr) * kb
    # A core holds share x tk*tn weights plus one tk input slice and tn partial sums; tn
    # grows in steps of nb columns, each step holding tk/kb blocks per layer.
    tnb_max = (budget - ACC_BYTES * tk) // (share * (tk // kb) * wbytes + ACC_BYTES * nb)
    if tnb_max < 1:
        return None
    pc = -(-(op.n // nb) // tnb_max)
    return Tiling(pr=pr, pc=pc, k=op.k, n=op.n, wbytes=wbytes, share=share, kblock=kb,
                  nblock=nb)


SCORE_BLOCK = 64  # positions a core scores at a time (its local online softmax)


def attention_buffers(op: Op, dh: int) -> int:
    """Per-core working set besides the cache, f32: the core's slice of its head group's
    queries and of their weighted-value accumulator (G x dh each), a block of scores and
    the running max and sum."""
    n, k, _ = op.heads
    g = n // k
    return ACC_BYTES * (2 * g * dh + SCORE_BLOCK * g + 2 * g)


def attention_tiling(op: Op, context: int, rows: int, budget: int, share: int = 1
                     ) -> Tiling | None:
    """Cores for one layer's KV cache at `context` positions.

    Each kv head gets its own block of columns (pc = K x columns per head). Within a head,
    positions are split over the pr rows and the head dimension over the columns, so a
    core holds positions/pr keys and values of H/cols dimensions each: scores are summed
    along a row, values along a column (WaferLLM spreads attention the same way). The
    fewest columns that fit the budget are used.
    """
    n, k, h = op.heads
    item = op.kv_bytes_per_token // (2 * k * h)
    pr = min(rows, context)
    positions = math.ceil(context / pr)
    for cols in range(1, h + 1):
        dh = math.ceil(h / cols)
        if cols != math.ceil(h / dh):
            continue  # same dh as fewer columns: no gain
        if share * positions * dh * 2 * item + attention_buffers(op, dh) <= budget:
            return Tiling(pr=pr, pc=k * cols, positions=positions, dh=dh, hd=h,
                          kv_bytes=2 * item, buffers=attention_buffers(op, dh), share=share)
    return None


def overlay_tiling(op: Op, target, context: int) -> Tiling | None:
    """The tiling of `op` over the whole wafer (every op overlaid on the same cores)."""
    rows, cols = target.rows, target.cols
    if op.kind == "attention":
        n, k, h = op.heads
        cph = min(cols // k, h)
        if cph < 1:
            return None
        dh = math.ceil(h / cph)
        cph = math.ceil(h / dh)
        pr = min(rows, context)
        item = op.kv_bytes_per_token // (2 * k * h)
        return Tiling(pr=pr, pc=k * cph, positions=math.ceil(context / pr), dh=dh, hd=h,
                      kv_bytes=2 * item, buffers=attention_buffers(op, dh))
    if op.is_tiled:
        kb, nb, wbytes = op.blocks
        return Tiling(pr=min(rows, op.k // kb), pc=min(cols, op.n // nb), k=op.k, n=op.n,
                      wbytes=wbytes, kblock=kb, nblock=nb)
    raise ValueError(f"op {op.name} ({op.kind}) has no region of its own")


def tile_op(op: Op, rows: int, budget: int, context: int, share: int = 1) -> Tiling | None:
    """The tiling of any placed op (matvec, owning lookup, attention)."""
    if op.kind == "attention":
        return attention_tiling(op, context, rows, budget, share)
    if op.is_tiled:
        return matvec_tiling(op, rows, budget, share)
    raise ValueError(f"op {op.name} ({op.kind}) has no region of its own")


def tile_weight(w_kn, t: Tiling, xp=np):
    """A (K, N) weight as tiles (pr, pc, tk, tn); slots of short tiles hold zeros."""
    w = xp.pad(w_kn, ((0, 1), (0, 1)))  # row K and column N are the zero slots
    ki = t.k_index()  # (pr, tk)
    ni = t.n_index()  # (pc, tn)
    return w[ki[:, None, :, None], ni[None, :, None, :]]
