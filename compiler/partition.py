"""Partitioning: how many cores each op needs and what each core holds.

MeshGEMV (WaferLLM, OSDI'25): a (K, N) weight is cut into a pr x pc grid of tiles, one per
core. The input vector is split along K over the pr rows (and replicated along the pc
columns); each core multiplies its K-slice by its tile; the pr partial sums of each
column are then reduced along K. Dimensions that do not divide are split into balanced
uneven parts (sizes differ by at most one), so no weight is padded or dropped; each core's
budget is checked against the largest tile.

A core's budget is its SRAM minus the target's reserve; in it go the tile, the input
slice and the partial-sum buffer (f32), or for attention its share of the KV cache.

The KV cache of each layer is spread evenly over that layer's attention cores, as in
WaferLLM's shift-based cache: a new token's keys and values enter at one edge and every
core passes its oldest entries on, so all cores hold the same number of positions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from compiler.ir import Op

ACC_BYTES = 4  # activations and partial sums are f32 on the cores


def bounds(total: int, parts: int) -> np.ndarray:
    """Balanced split points of `total` items into `parts`: part i is [b[i], b[i+1]).
    Parts differ by at most one item, so nothing is padded and nothing is lost."""
    return (np.arange(parts + 1, dtype=np.int64) * total) // parts


def split_index(total: int, parts: int, width: int) -> np.ndarray:
    """(parts, width) indices of each part's items; slots past a short part hold `total`
    (an index one past the end, which callers map to zero)."""
    b = bounds(total, parts)
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
    wbytes: int = 0  # matvec: bytes per weight element.
    positions: int = 0  # attention: most cache positions on one core (of one kv head).
    kv_bytes: int = 0  # attention: bytes per position on a core (one head's k and v).
    buffers: int = 0  # attention: working buffers per core.

    @property
    def cores(self) -> int:
        return self.pr * self.pc

    @property
    def tk(self) -> int:
        """Most K elements on one core."""
        return -(-self.k // self.pr) if self.k else 0

    @property
    def tn(self) -> int:
        """Most N elements on one core."""
        return -(-self.n // self.pc) if self.n else 0

    @property
    def bytes_per_core(self) -> int:
        """Bytes on the fullest core of the region."""
        if self.k:
            return self.tk * self.tn * self.wbytes + ACC_BYTES * (self.tk + self.tn)
        return self.positions * self.kv_bytes + self.buffers

    def core_bytes(self) -> np.ndarray:
        """Bytes on every core of the region, (pr, pc)."""
        if self.k:
            lk = np.diff(bounds(self.k, self.pr))[:, None]
            ln = np.diff(bounds(self.n, self.pc))[None, :]
            return lk * ln * self.wbytes + ACC_BYTES * (lk + ln)
        return np.full((self.pr, self.pc), self.bytes_per_core, np.int64)


def matvec_tiling(op: Op, rows: int, budget: int) -> Tiling | None:
    """The narrowest tiling of `op` over at most `rows` core rows; None if even one
    column of K-slices exceeds the budget."""
    wbytes = np.dtype(op.weight_dtype).itemsize
    pr = min(rows, op.k)
    tk = -(-op.k // pr)
    # A core holds tk*tn weights plus its tk input slice and tn partial sums.
    tn_max = (budget - ACC_BYTES * tk) // (tk * wbytes + ACC_BYTES)
    if tn_max < 1:
        return None
    pc = -(-op.n // tn_max)
    return Tiling(pr=pr, pc=pc, k=op.k, n=op.n, wbytes=wbytes)


def attention_buffers(op: Op) -> int:
    """Per-core working set of attention besides the cache: the queries of one kv head's
    group and their softmax accumulator (G*H values each, f32), plus max and sum per head."""
    n, k, h = op.heads
    g = n // k
    return ACC_BYTES * (2 * g * h + 2 * g)


def attention_tiling(op: Op, context: int, rows: int, budget: int) -> Tiling | None:
    """Cores for one layer's KV cache at `context` positions.

    Each kv head gets its own columns (pc = K x columns per head), so a core holds keys and
    values of one head only and needs only that head's group of queries; within a head the
    positions are spread evenly over its pr x (pc / K) cores.
    """
    n, k, h = op.heads
    per_position = op.kv_bytes_per_token // k  # one head's key and value
    buffers = attention_buffers(op)
    per_core = (budget - buffers) // per_position  # positions a core can hold
    if per_core < 1:
        return None
    cores_per_head = max(1, math.ceil(context / per_core))
    pr = min(rows, cores_per_head)
    cols_per_head = math.ceil(cores_per_head / pr)
    return Tiling(pr=pr, pc=k * cols_per_head,
                  positions=math.ceil(context / (pr * cols_per_head)),
                  kv_bytes=per_position, buffers=buffers)


def tile_op(op: Op, rows: int, budget: int, context: int) -> Tiling | None:
    """The tiling of any placed op (matvec, owning lookup, attention)."""
    if op.kind == "attention":
        return attention_tiling(op, context, rows, budget)
    if op.is_tiled:
        return matvec_tiling(op, rows, budget)
    raise ValueError(f"op {op.name} ({op.kind}) has no region of its own")


def tile_weight(w_kn, t: Tiling, xp=np):
    """A (K, N) weight as tiles (pr, pc, tk, tn); slots of short tiles hold zeros."""
    w = xp.pad(w_kn, ((0, 1), (0, 1)))  # row K and column N are the zero slots
    ki = split_index(t.k, t.pr, t.tk)  # (pr, tk)
    ni = split_index(t.n, t.pc, t.tn)  # (pc, tn)
    return w[ki[:, None, :, None], ni[None, :, None, :]]
