"""The compiler's operator graph: what one decode step does, op by op, in execution order.

Built by `frontend.trace_decode_step` from the model's own traced program (a jaxpr); never
written by hand. Four kinds of op:

  matvec     y = x @ W for a parameter W, seen as a (K, N) matrix: K contracted, N produced.
             Tiled over a pr x pc rectangle of cores (MeshGEMV).
  lookup     a row of a parameter table (V, D) picked by a token id (the embedding).
  attention  append this token's keys and values to the KV cache, attend over the cache.
  vector     element-wise and reduction work on activation vectors: norms, rotary,
             activations, residual adds, biases. Small parameters (norm scales, q/k/v
             biases), read element-wise, ride along.

Every parameter belongs to exactly one op (`Op.weight` or `Op.params`); a tied output
projection is a matvec over the embedding table, and the lookup then reads that op's tiles
(`Op.shares`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("matvec", "lookup", "attention", "vector")


class CompilerError(ValueError):
    """The model or request cannot be compiled for the target; the message says why."""


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """A model parameter as the compiler sees it."""

    name: str  # Dotted path, e.g. 'blocks.0.attn.q'.
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclasses.dataclass
class Op:
    """One operator of the decode step."""

    name: str  # Unique; matvec and lookup ops are named by their parameter's path.
    kind: str  # One of KINDS.
    layer: int | None  # Decoder block index, None outside the blocks (embedding, head).
    eqns: tuple[int, ...]  # Indices of the jaxpr equations this op covers.
    inputs: tuple[str, ...] = ()  # Ops whose outputs this op reads.
    out_bytes: int = 0  # Bytes of its output per token (what flows to consumers).
    weight: str | None = None  # matvec/lookup: the parameter multiplied or indexed.
    k: int = 0  # matvec: contracted length; lookup: table rows (V).
    n: int = 0  # matvec: output length; lookup: row width (D); attention: query width.
    transposed: bool = False  # matvec: the parameter is stored (N, K).
    operand: int = 1  # matvec/lookup: which operand of the equation is the parameter.
    weight_dtype: str = "float32"
    shares: str | None = None  # lookup: the matvec op whose tiles hold its (tied) table.
    params: tuple[str, ...] = ()  # vector: small parameters it owns (norm scales, biases).
    roles: tuple[str, ...] = ()  # vector: 'norm', 'rotary', 'bias', 'activation', 'residual'...
    kv_bytes_per_token: int = 0  # attention: cache bytes one token adds (keys + values).
    heads: tuple[int, int, int] = (0, 0, 0)  # attention: (N query heads, K kv heads, H).

    @property
    def is_tiled(self) -> bool:
        """Ops that own a weight matrix cut into tiles."""
        return self.kind == "matvec" or (self.kind == "lookup" and self.shares is None)

    @property
    def weight_bytes(self) -> int:
        return self.k * self.n * np.dtype(self.weight_dtype).itemsize if self.is_tiled else 0

    def describe(self) -> str:
        if self.kind == "matvec":
            t = " (stored N x K)" if self.transposed else ""
            return f"[{self.k}, {self.n}] {self.weight_dtype}{t}"
        if self.kind == "lookup":
            src = f" reads {self.shares}" if self.shares else ""
            return f"table [{self.k}, {self.n}]{src}"
        if self.kind == "attention":
            return f"kv {self.kv_bytes_per_token} B/token"
        return "+".join(self.roles) + (f" params {', '.join(self.params)}" if self.params else "")


@dataclasses.dataclass
class Graph:
    """The decode step: ops in execution order, and every parameter once."""

    ops: list[Op]
    params: dict[str, ParamInfo]  # In order of first use.
    param_order: tuple[str, ...]  # Parameter names in the traced program's argument order.
    jaxpr: Any  # The ClosedJaxpr the ops index into.
    batch: int = 1

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(f"no op named {name!r}")

    @property
    def layers(self) -> list[int]:
        return sorted({o.layer for o in self.ops if o.layer is not None})

    def owner(self) -> dict[str, str]:
        """Parameter name -> the op that owns it."""
        out: dict[str, str] = {}
        for o in self.ops:
            owned = ((o.weight,) if o.is_tiled else ()) + o.params
            for p in owned:
                out[p] = o.name
        return out


def check_graph(g: Graph) -> None:
    """Invariants of a well-formed graph; raises CompilerError naming the first violation."""
    names = [o.name for o in g.ops]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CompilerError(f"duplicate op names {dup[:5]}")
    seen: set[str] = set()
    owned: list[str] = []
    eqns: list[int] = []
    for o in g.ops:
        if o.kind not in KINDS:
            raise CompilerError(f"op {o.name}: unknown kind {o.kind!r}")
        for i in o.inputs:
            if i not in seen:
                raise CompilerError(f"op {o.name} reads {i!r}, which does not run before it")
        if o.kind == "matvec" and (o.k <= 0 or o.n <= 0 or o.weight not in g.params):
            raise CompilerError(f"matvec {o.name} has no valid weight")
        if o.kind == "lookup" and o.shares is not None and o.shares not in names:
            raise CompilerError(f"lookup {o.name} shares unknown op {o.shares!r}")
        owned += ([o.weight] if o.is_tiled else []) + list(o.params)
        eqns += list(o.eqns)
        seen.add(o.name)
    if sorted(owned) != sorted(g.params):
        missing = sorted(set(g.params) - set(owned))
        twice = sorted({p for p in owned if owned.count(p) > 1})
        raise CompilerError(f"parameters not owned exactly once: missing {missing[:5]}, "
                            f"owned twice {twice[:5]}")
    if len(set(eqns)) != len(eqns) or eqns != sorted(eqns):
        raise CompilerError("ops must cover disjoint equations in execution order")


def format_graph(g: Graph) -> str:
    """A readable listing: one line per op, parameters with their shapes."""
    lines = [f"decode step: {len(g.ops)} ops, {len(g.params)} parameters, "
             f"{sum(p.size for p in g.params.values()):,} weights"]
    width = max(len(o.name) for o in g.ops)
    for i, o in enumerate(g.ops):
        layer = "-" if o.layer is None else str(o.layer)
        lines.append(f"{i:5d}  L{layer:>3}  {o.kind:<9}  {o.name:<{width}}  {o.describe()}")
    lines.append("parameters (execution order):")
    owner = g.owner()
    for p in g.params.values():
        lines.append(f"  {p.name:<{width}}  {list(p.shape)} {p.dtype}  -> {owner.get(p.name)}")
    return "\n".join(lines)
