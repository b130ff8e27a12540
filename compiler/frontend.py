"""Frontend: trace the model's one-token decode step and build the operator graph from it.

The step is `Transformer.cached` plus `Transformer.logits` at batch 1 over a KV cache,
traced with `jax.make_jaxpr` on abstract shapes, so an 80-layer 70B model costs no memory.
The graph is read off the jaxpr by rules keyed by primitive (as JAX's own interpreters
are): layout primitives pass a parameter's identity through (a (D, N, H) weight reshaped to
(D, N*H) is still that weight), `dot_general` with a parameter operand is a matvec, the
attention kernel's named `jit` is the attention op, an integer-indexed read of a parameter
is a lookup, and every other known primitive is vector work. A primitive with no rule
stops the compiler with its name, rather than being costed as something it is not.

Nothing here knows the layer structure: a new preset or a changed block needs no change.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from compiler.ir import (DENSE_FORMATS, WEIGHT_FORMATS, CompilerError, Graph, Op, ParamInfo,
                         check_graph, is_packed, weight_layout)
from spark_model import kernels
from spark_model.checkpoint import param_name
from spark_model.config import ModelConfig
from spark_model.kv_cache import ATTENTION_OP, KVCache, cache_length
from spark_model.transformer import abstract_model

# Primitives that only re-lay out an array: a parameter stays itself through them.
LAYOUT = {"reshape", "convert_element_type", "transpose", "squeeze", "expand_dims", "copy",
          "copy_p"}
# Primitives that are vector work (element-wise, reductions, shuffles, constants).
VECTOR = {
    "add", "sub", "mul", "div", "neg", "max", "min", "pow", "integer_pow", "square", "sqrt",
    "rsqrt", "exp", "exp2", "log", "log1p", "logistic", "tanh", "sin", "cos", "erf", "abs",
    "sign", "reduce_sum", "reduce_max", "reduce_min", "argmax", "broadcast_in_dim",
    "concatenate", "split", "slice", "dynamic_slice", "select_n", "iota", "eq", "ne", "lt",
    "le", "gt", "ge", "and", "or", "not", "stop_gradient", "clamp", "floor", "ceil", "round",
    "cumsum", "rem", "pjit", "jit", "custom_jvp_call", "custom_vjp_call", "shift_left",
    "shift_right_logical",
} | LAYOUT
# Primitives through which vector work may read a parameter of any rank: element by
# element, after broadcasting it over batch and time (norm scales (D,), q/k/v biases
# (N, H)). Such a parameter rides along with its vector op; anything else that reads a
# matrix (a reduction, a gather) has no rule and is refused.
ELEMENTWISE = {"broadcast_in_dim", "add", "sub", "mul"}
# What a vector segment is doing, recognised from the primitives it contains.
ROLE_OF = {"rsqrt": "norm", "sin": "rotary", "cos": "rotary", "logistic": "activation",
           "tanh": "activation", "erf": "activation",
           "shift_right_logical": "rotary"}  # spark_model.rotary's fixed-point angles


def param_tree(cfg: ModelConfig):
    """(names, abstract leaves, graphdef, treedef) of the model's parameters."""
    graphdef, state = nnx.split(abstract_model(cfg))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [param_name(path) for path, _ in leaves_with_path]
    return names, [leaf for _, leaf in leaves_with_path], graphdef, treedef


def decode_step(graphdef, treedef):
    """step(param_leaves, tokens (B,1), positions (B,1), cache) -> (logits (B,1,V), cache)."""

    def step(leaves, tokens_bt, positions_bt, cache: KVCache):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        x_btd, cache = model.cached(tokens_bt, positions_bt, cache)
        return model.logits(x_btd), cache

    return step


def abstract_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    spec = jax.ShapeDtypeStruct((batch, cfg.n_kv_heads, length, cfg.head_dim),
                                jnp.dtype(cfg.dtype))  # (B, K, S, H)
    return KVCache(k=(spec,) * cfg.n_layers, v=(spec,) * cfg.n_layers)


def trace(cfg: ModelConfig, cache_len: int | None = None, batch: int = 1, rows: int = 1):
    """The decode step's ClosedJaxpr, and the parameter names in argument order; rows > 1:
    a verify step of that many tokens at consecutive positions (compiler.speculate)."""
    names, leaves, graphdef, treedef = param_tree(cfg)
    cache_len = cache_len or cache_length(1)
    tok = jax.ShapeDtypeStruct((batch, rows), jnp.int32)
    # The model's own operations, not the CPU's native decode kernels (a fresh closure, so
    # no earlier trace of the step is reused).
    with kernels.disabled():
        closed = jax.make_jaxpr(decode_step(graphdef, treedef))(
            leaves, tok, tok, abstract_cache(cfg, batch, cache_len))
    return closed, names, leaves


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _prefix(name: str, depth: int = 1) -> str:
    return name.rsplit(".", depth)[0] if name.count(".") >= depth else name


def _layer_of(names: list[str]) -> int | None:
    for name in names:
        for part in name.split("."):
            if part.isdigit():
                return int(part)
    return None


def _check_known(eqn) -> None:
    """Vector work must be made of primitives we know (nested jits are looked into)."""
    name = eqn.primitive.name
    if name not in VECTOR:
        raise CompilerError(f"no compiler rule for primitive {name!r}; add it to "
                            "compiler.frontend.VECTOR if it is vector work")
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if inner is not None:
        for e in _open(inner).eqns:
            _check_known(e)


def _open(j):
    return j.jaxpr if hasattr(j, "jaxpr") else j


def _inner_prims(eqn) -> set[str]:
    out = {eqn.primitive.name}
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if inner is not None:
        for e in _open(inner).eqns:
            out |= _inner_prims(e)
    if eqn.params.get("name"):
        out.add(str(eqn.params["name"]))
    return out


class _Builder:
    """Walks the jaxpr once, grouping equations into ops."""

    def __init__(self, closed, names: list[str], leaves: list[Any]):
        self.jaxpr = closed.jaxpr
        self.names = names
        n_params = len(names)
        invars = self.jaxpr.invars
        # var -> parameter name, for parameters and their re-laid-out views.
        self.param_of: dict[Any, str] = {v: names[i] for i, v in enumerate(invars[:n_params])}
        self.leaves = dict(zip(names, leaves))
        self.producer: dict[Any, str] = {}  # var -> op that computed it
        self.ops: list[Op] = []
        self.used: list[str] = []  # parameters in order of first use
        self.segment: list[int] = []  # pending vector equations

    # ---- helpers -------------------------------------------------------------------

    def _use(self, p: str) -> None:
        if p not in self.used:
            self.used.append(p)

    def _inputs(self, eqn_ids) -> tuple[str, ...]:
        out: list[str] = []
        for i in eqn_ids:
            for v in self.jaxpr.eqns[i].invars:
                src = self.producer.get(v) if isinstance(v, jcore.Var) else None
                if src is not None and src not in out:
                    out.append(src)
        return tuple(out)

    def _emit(self, op: Op, outvars) -> None:
        op.inputs = tuple(i for i in self._inputs(op.eqns) if i != op.name)
        names = {o.name for o in self.ops}
        base, k = op.name, 2
        while op.name in names:
            op.name, k = f"{base}#{k}", k + 1
        # Work with no parameter of its own (rotary, activation, attention) belongs to the
        # layer of the op before it; norms are placed by their scale's path.
        if op.layer is None and self.ops and self.ops[-1].layer is not None and op.kind in (
                "vector", "attention") and not op.params:
            op.layer = self.ops[-1].layer
        self.ops.append(op)
        for v in outvars:
            self.producer[v] = op.name

    def _flush(self) -> None:
        """Close the pending vector segment (layout-only segments make no op)."""
        ids, self.segment = self.segment, []
        if not ids:
            return
        eqns = [self.jaxpr.eqns[i] for i in ids]
        prims = set().union(*(_inner_prims(e) for e in eqns))
        work = {e.primitive.name for e in eqns} - LAYOUT - {"broadcast_in_dim"}
        produced = [v for e in eqns for v in e.outvars]
        if not work:  # pure re-layout: no work, outputs belong to whoever fed them
            for e in eqns:
                srcs = [self.producer[v] for v in e.invars
                        if isinstance(v, jcore.Var) and v in self.producer]
                for v in e.outvars:
                    if srcs:
                        self.producer[v] = srcs[0]
            return
        params = tuple(p for e in eqns for v in e.invars
                       if isinstance(v, jcore.Var) and (p := self.param_of.get(v)))
        params = tuple(dict.fromkeys(params))
        roles = sorted({ROLE_OF[p] for p in prims if p in ROLE_OF}
                       | ({"activation"} if "silu" in prims or "gelu" in prims else set()))
        roles = (["residual"] if self._has_residual(eqns, produced) else []) + roles
        roles = (["bias"] if self._has_bias(eqns) else []) + roles
        roles = roles or ["elementwise"]
        if params and "bias" in roles:  # e.g. blocks.0.attn.bias+rotary
            name = f"{_prefix(params[0])}.{'+'.join(roles)}"
        elif params:  # a norm, named by its scale's module: blocks.0.attn_norm
            name = _prefix(params[0])
        else:
            prev = next((o for o in reversed(self.ops) if o.weight), None)
            name = f"{_prefix(prev.weight) if prev else 'input'}.{'+'.join(roles)}"
        last = self._consumed_outputs(ids, produced)
        out_bytes = sum(_nbytes(v.aval) for v in last)
        self._emit(Op(name=name, kind="vector", layer=_layer_of(list(params)), eqns=tuple(ids),
                      params=params, roles=tuple(roles), out_bytes=out_bytes), produced)
        for p in params:
            self._use(p)

    def _has_residual(self, eqns, produced) -> bool:
        """A residual add sums two vectors made by other ops (an add inside a norm or the
        rotary works on values made within the segment, or on a constant). A value only
        re-laid out within the segment (a reshape of another op's output) still counts as
        made by that op."""
        inside = set(produced)
        relaid = {e.outvars[0]: e.invars[0] for e in eqns
                  if e.primitive.name in LAYOUT and isinstance(e.invars[0], jcore.Var)}

        def from_other_op(v) -> bool:
            if not isinstance(v, jcore.Var):  # a literal (a constant of the rotary's)
                return False
            while v in relaid:
                v = relaid[v]
            return isinstance(v, jcore.Var) and v not in inside and v in self.producer

        return any(e.primitive.name == "add" and all(map(from_other_op, e.invars))
                   for e in eqns)

    def _has_bias(self, eqns) -> bool:
        """A bias adds a parameter (broadcast over batch and time) to an activation."""
        from_param = set(self.param_of)
        for e in eqns:
            v = e.invars[0]
            if e.primitive.name == "broadcast_in_dim" and isinstance(v, jcore.Var) \
                    and v in from_param:
                from_param.add(e.outvars[0])
        return any(e.primitive.name == "add" and any(
            isinstance(v, jcore.Var) and v in from_param for v in e.invars) for e in eqns)

    def _consumed_outputs(self, ids, produced):
        """Outputs of equations `ids` that something outside them reads."""
        inside = set(ids)
        outer = set(self.jaxpr.outvars)
        read = set()
        for j, e in enumerate(self.jaxpr.eqns):
            if j not in inside:
                read |= {v for v in e.invars if isinstance(v, jcore.Var)}
        return [v for v in produced if v in read or v in outer]

    # ---- rules ---------------------------------------------------------------------

    def build(self) -> list[Op]:
        for i, eqn in enumerate(self.jaxpr.eqns):
            prim = eqn.primitive.name
            pvars = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in self.param_of]
            if prim in LAYOUT and pvars:
                self.param_of[eqn.outvars[0]] = self.param_of[pvars[0]]
            elif prim == "dot_general" and pvars:
                self._flush()
                self._matvec(i, eqn, pvars[0])
            elif prim in ("jit", "pjit") and eqn.params.get("name") == ATTENTION_OP:
                self._flush()
                self._attention(i, eqn)
            elif pvars and any(jnp.issubdtype(v.aval.dtype, jnp.integer)
                               for v in eqn.invars if isinstance(v, jcore.Var)):
                self._flush()
                self._lookup(i, eqn, pvars[0])
            elif pvars and prim not in ELEMENTWISE and any(
                    len(self.leaves[self.param_of[v]].shape) > 1 for v in pvars):
                raise CompilerError(
                    f"parameter {self.param_of[pvars[0]]} is used by {prim!r}, which the "
                    "compiler cannot tile (only matrix products and lookups read matrices; "
                    "vector work reads parameters element-wise)")
            else:
                _check_known(eqn)
                self.segment.append(i)
        self._flush()
        return self.ops

    def _matvec(self, i: int, eqn, w) -> None:
        name = self.param_of[w]
        (lc, rc), _ = eqn.params["dimension_numbers"]
        w_is_rhs = eqn.invars[1] is w
        contract = rc if w_is_rhs else lc
        shape = w.aval.shape
        k = int(np.prod([shape[d] for d in contract]))
        n = int(np.prod(shape)) // k
        transposed = tuple(contract) != tuple(range(len(contract)))
        existing = next((o for o in self.ops if o.weight == name), None)
        op = Op(name=name, kind="matvec", layer=_layer_of([name]), eqns=(i,), weight=name,
                k=k, n=n, transposed=transposed, operand=1 if w_is_rhs else 0,
                out_bytes=_nbytes(eqn.outvars[0].aval),
                weight_dtype=str(self.leaves[name].dtype))
        if existing is not None and existing.kind == "lookup":
            # A tied table: the matvec owns the tiles, the earlier lookup reads them.
            existing.shares = name
        elif existing is not None:
            raise CompilerError(f"parameter {name} is multiplied twice in one step")
        self._emit(op, eqn.outvars)
        self._use(name)

    def _lookup(self, i: int, eqn, w) -> None:
        name = self.param_of[w]
        shape = self.leaves[name].shape
        if len(shape) != 2:
            raise CompilerError(f"lookup into {name} of rank {len(shape)}; tables are (V, D)")
        self._emit(Op(name=f"{name}.lookup", kind="lookup", layer=_layer_of([name]),
                      eqns=(i,), weight=name, k=int(shape[0]), n=int(shape[1]),
                      operand=list(eqn.invars).index(w),
                      out_bytes=_nbytes(eqn.outvars[0].aval),
                      weight_dtype=str(self.leaves[name].dtype)), eqn.outvars)
        self._use(name)

    def _attention(self, i: int, eqn) -> None:
        # Operands of kv_cache.attend: q, k_new, v_new, k_cache, v_cache, positions.
        q, k_new, v_new, k_cache = eqn.invars[:4]
        b, t = q.aval.shape[:2]
        itemsize = np.dtype(k_cache.aval.dtype).itemsize
        per_token = (k_new.aval.size + v_new.aval.size) // (b * t) * itemsize
        prev = next((o for o in reversed(self.ops) if o.weight), None)
        name = f"{_prefix(prev.weight) if prev else 'attention'}.kv_cache"
        self._emit(Op(name=name, kind="attention", layer=prev.layer if prev else None,
                      eqns=(i,), out_bytes=_nbytes(eqn.outvars[0].aval),
                      n=int(np.prod(q.aval.shape[2:])), kv_bytes_per_token=int(per_token),
                      heads=(int(q.aval.shape[2]), int(k_new.aval.shape[2]),
                             int(q.aval.shape[3]))),
                   eqn.outvars)


def apply_weight_format(ops: list[Op], weights: str | None) -> None:
    """Record on every tiled op (and the lookups that read a tied table) how its weight is
    stored: `weights` is one of ir.WEIGHT_FORMATS, or None for the parameter's own dtype.
    A packed format needs the blocked axis (K of a matvec, the row of a lookup table) to
    be a whole number of blocks; a weight whose axis is not is an error naming it."""
    if weights is None:
        return
    if weights not in WEIGHT_FORMATS:
        raise CompilerError(f"unknown weight format {weights!r} (expected one of "
                            f"{', '.join(WEIGHT_FORMATS)})")
    fmt = DENSE_FORMATS.get(weights, weights)
    per, _ = weight_layout(fmt)
    for o in ops:
        if o.kind not in ("matvec", "lookup"):
            continue
        if o.is_tiled and is_packed(fmt):
            axis, length = ("row (D)", o.n) if o.kind == "lookup" else ("input axis K", o.k)
            if length % per:
                raise CompilerError(f"weight {o.weight} cannot be stored as {weights}: its "
                                    f"{axis} has {length} weights, not a multiple of the "
                                    f"{per}-weight block")
        o.weight_dtype = fmt


def build_graph(cfg: ModelConfig, cache_len: int | None = None,
                weights: str | None = None, rows: int = 1) -> Graph:
    """The operator graph of `cfg`'s decode step (from shapes alone), its matrices stored
    as `weights` (see apply_weight_format; None: the parameters' own dtype). rows > 1
    traces a verify step of that many tokens: the same ops, each on `rows` rows (its
    out_bytes are those of all rows; the cost model prices rows from the one-row graph)."""
    closed, names, leaves = trace(cfg, cache_len, rows=rows)
    b = _Builder(closed, names, leaves)
    ops = b.build()
    apply_weight_format(ops, weights)
    unused = [n for n in names if n not in b.used]
    if unused:
        raise CompilerError(f"parameters never used by the decode step: {unused[:5]}")
    params = {n: ParamInfo(n, tuple(int(d) for d in b.leaves[n].shape),
                           str(b.leaves[n].dtype)) for n in b.used}
    g = Graph(ops=ops, params=params, param_order=tuple(names), jaxpr=closed)
    check_graph(g)
    return g
