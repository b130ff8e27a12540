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

# Weight storage formats a compile may ask for (`compile(..., weights=)`, `--weights`): two
# dense dtypes and the packed block formats of spark_model.quant. Dense names map to the
# NumPy dtype an op records; packed ones are recorded by name.
DENSE_FORMATS = {"f32": "float32", "bf16": "bfloat16"}
PACKED_BLOCK = 32  # weights per block of every packed format (spark_model.quant.BLOCK)
# Bytes of one 32-weight block: quants plus an f16 scale (and an f16 minimum for q4_1),
# as spark_model.quant.FORMATS gives them (tests/test_compiler_quant.py checks they agree).
PACKED_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
WEIGHT_FORMATS = tuple(DENSE_FORMATS) + tuple(PACKED_BLOCK_BYTES)


def weight_layout(fmt: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a weight storage format: a dense dtype name
    ('float32', 'bfloat16') is (1, its item size); a packed format ('q8_0', 'q4_0',
    'q4_1') is (32, its block's bytes)."""
    if fmt in PACKED_BLOCK_BYTES:
        return PACKED_BLOCK, PACKED_BLOCK_BYTES[fmt]
    return 1, np.dtype(fmt).itemsize


def is_packed(fmt: str) -> bool:
    return fmt in PACKED_BLOCK_BYTES


def weight_format_of(cfg: Any) -> str:
    """The weight format a model config's own parameter dtype is ('f32', 'bf16', or the
    dtype's name)."""
    names = {v: k for k, v in DENSE_FORMATS.items()}
    return names.get(cfg.param_dtype, cfg.param_dtype)


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
    # matvec/lookup: how the weight is stored on the cores: a dense dtype name or a packed
    # block format (see weight_layout). Packed blocks run along K for a matvec (the input
    # axis) and along N (the row, D) for a lookup's own (V, D) table, as in a GGUF file.
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
    def blocks(self) -> tuple[int, int, int]:
        """(weights per block along K, along N, bytes per block) of its stored weight."""
        per, nbytes = weight_layout(self.weight_dtype)
        return (1, per, nbytes) if self.kind == "lookup" else (per, 1, nbytes)

    @property
    def weight_bytes(self) -> int:
        """Bytes of its weight as stored (packed: quants, scales and minimums)."""
        if not self.is_tiled:
            return 0
        kb, nb, nbytes = self.blocks
        return (self.k // kb) * (self.n // nb) * nbytes

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

    def weight_bytes(self) -> int:
        """Bytes of every parameter as stored: tiled weights in their op's format, the
        small parameters that ride along with vector work in their own dtype."""
        tiled = {o.weight: o.weight_bytes for o in self.ops if o.is_tiled}
        return sum(tiled.get(n, p.nbytes) for n, p in self.params.items())

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
