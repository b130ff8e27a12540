"""Functional execution of a plan: one decode step computed the way the placed program does.

An interpreter over the decode step's jaxpr (an environment and a loop over equations, as
in JAX's own `eval_jaxpr`) that replaces each placed op by what its cores compute:

  matvec     the weight cut into the plan's balanced (pr, pc) tiles; each core multiplies
             its K-slice of the input by its tile; the pr partial sums of every column are
             added pairwise up a binary tree (the K-tree reduction, K = 2).
  lookup     the row read out of the tiles that hold the table (for a tied embedding,
             the output projection's tiles, read along a tile column).
  attention  the cache spread over the region's cores (positions over rows, head dimensions
             over columns); scores are summed along rows, every row keeps a partial
             softmax, and the partials are merged by rescaling to the global max.
  vector     the traced primitives themselves, unchanged.

Everything is vectorised over cores (einsum over the tile axes), and the whole step is one
`jax.jit`, so executing a plan for `tiny` takes milliseconds per token.

Over a compiler.plan.Plan: `leaves` (its parameters in argument order), `Runner` (runs its
decode step, tracing once per cache length), `execute` (one step) and `generate_greedy`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.extend import core as jcore

from compiler import frontend
from compiler.ir import CompilerError, Op
from compiler.partition import Tiling, split_index, tile_weight
from compiler.speculate import MAX_ROWS as MAX_VERIFY_ROWS

_NEG = -1e30


def ktree_sum(parts: jax.Array) -> jax.Array:
    """Sum over axis 0 pairwise, level by level (the K-tree reduction with K = 2)."""
    while parts.shape[0] > 1:
        if parts.shape[0] % 2:
            parts = jnp.concatenate([parts, jnp.zeros_like(parts[:1])])
        parts = parts[0::2] + parts[1::2]
    return parts[0]


def _as_kn(w: jax.Array, contract: tuple[int, ...]) -> jax.Array:
    """A weight as the (K, N) matrix its matvec multiplies: contracted axes first."""
    free = [d for d in range(w.ndim) if d not in contract]
    k = math.prod(w.shape[d] for d in contract)
    return jnp.transpose(w, list(contract) + free).reshape(k, -1)


def tiled_matvec(eqn, invals, op: Op, t: Tiling) -> jax.Array:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        raise CompilerError(f"matvec {op.name}: batched dot_general is not supported")
    wi = op.operand
    w, x = invals[wi], invals[1 - wi]
    cw, cx = (rc, lc) if wi == 1 else (lc, rc)
    w_kn = _as_kn(w, tuple(cw))  # (K, N)
    x_free = [d for d in range(x.ndim) if d not in cx]
    x_mk = jnp.transpose(x, x_free + list(cx)).reshape(-1, w_kn.shape[0])  # (M, K)
    tiles = tile_weight(w_kn, t, jnp)  # (pr, pc, tk, tn)
    ki, ni = t.k_index(), t.n_index()
    x_mrk = jnp.pad(x_mk, ((0, 0), (0, 1)))[:, ki]  # each core row's K-slice, (M, pr, tk)
    acc = jnp.float32 if x.dtype != jnp.float64 else x.dtype
    partial = jnp.einsum("mrk,rckn->rcmn", x_mrk, tiles, preferred_element_type=acc,
                         precision=jax.lax.Precision.HIGHEST)  # each core's local product
    y = rearrange(ktree_sum(partial), "c m n -> m (c n)")
    y = y[:, np.flatnonzero(ni.ravel() < t.n)]  # drop the empty slots of short tiles
    w_free = [w.shape[d] for d in range(w.ndim) if d not in cw]
    y = y.reshape([x.shape[d] for d in x_free] + w_free)
    if wi == 0:  # dot_general puts the lhs's free axes first
        y = jnp.moveaxis(y, list(range(len(x_free))), list(range(len(w_free), y.ndim)))
    return y.astype(eqn.outvars[0].aval.dtype)


def tiled_lookup(eqn, invals, op: Op, owner: Op, t: Tiling) -> jax.Array:
    """Rows of a (V, D) table read from the tiles that hold it."""
    table, ids = invals[op.operand], invals[1 - op.operand]
    ki, ni = t.k_index(), t.n_index()
    if owner.kind == "matvec":  # tied: tiles cut the (D, V) output projection by column
        tiles = tile_weight(_as_kn(table, (1,) if owner.transposed else (0,)), t, jnp)
        nb = jnp.asarray(t.n_bounds())
        j = jnp.searchsorted(nb, ids, side="right") - 1
        local = ids - nb[j]
        rows = tiles[:, j, :, local].reshape(*ids.shape, -1)  # (*ids, pr * tk)
        rows = rows[..., np.flatnonzero(ki.ravel() < t.k)]
    else:  # the table's own tiles, (V, D) cut into (pr, pc, tk, tn) by row
        tiles = tile_weight(table, t, jnp)
        kb = jnp.asarray(t.k_bounds())
        i = jnp.searchsorted(kb, ids, side="right") - 1
        local = ids - kb[i]
        rows = tiles[i, :, local, :].reshape(*ids.shape, -1)  # (*ids, pc * tn)
        rows = rows[..., np.flatnonzero(ni.ravel() < t.n)]
    return rows.astype(eqn.outvars[0].aval.dtype)


def sharded_attention(invals, rows: int, cols: int) -> list[jax.Array]:
    """kv_cache.attend with each kv head's cache on rows x cols cores: positions split
    over the rows, head dimensions over the columns.

    Each core scores its positions on its dimensions; the partial scores are summed along
    the row (a K-tree), each row keeps a partial softmax (max, sum, weighted values of its
    dimensions), and the rows' partials are merged by rescaling to the global max.
    """
    q_btnh, k_btkh, v_btkh, k_bksh, v_bksh, pos_bt = invals
    b, t, n, h = q_btnh.shape
    n_kv, s_len = k_bksh.shape[1], k_bksh.shape[2]
    zero = jnp.zeros((), pos_bt.dtype)
    for i in range(b):  # append this token's keys and values at its position
        at = (i + zero, zero, pos_bt[i, 0], zero)
        k_bksh = jax.lax.dynamic_update_slice(
            k_bksh, rearrange(k_btkh[i:i + 1], "b t k h -> b k t h").astype(k_bksh.dtype), at)
        v_bksh = jax.lax.dynamic_update_slice(
            v_bksh, rearrange(v_btkh[i:i + 1], "b t k h -> b k t h").astype(v_bksh.dtype), at)
    pi = split_index(s_len, rows, -(-s_len // rows))  # (P, c) positions; s_len = empty
    di = split_index(h, cols, -(-h // cols))  # (J, d) dimensions; h = empty
    pad = ((0, 0), (0, 0), (0, 1), (0, 1))  # one zero position and one zero dimension
    k6 = jnp.pad(k_bksh, pad)[:, :, pi][..., di].astype(jnp.float32)  # (B, K, P, c, J, d)
    v6 = jnp.pad(v_bksh, pad)[:, :, pi][..., di].astype(jnp.float32)
    q = rearrange(q_btnh, "b t (k g) h -> b k g t h", k=n_kv).astype(jnp.float32)
    q = jnp.pad(q / math.sqrt(h), ((0, 0),) * 4 + ((0, 1),))[..., di]  # (B, K, G, T, J, d)
    hi = jax.lax.Precision.HIGHEST
    partial = jnp.einsum("bkgtjd,bkpcjd->jbkgtpc", q, k6, precision=hi)  # per core
    s = ktree_sum(partial)  # summed along each row of cores, (B, K, G, T, P, c)
    mask = jnp.asarray(pi)[None, None, None, None] <= pos_bt[:, None, None, :, None, None]
    s = jnp.where(mask, s, _NEG)
    m_p = s.max(axis=-1)  # each row's max, (B, K, G, T, P)
    e = jnp.where(mask, jnp.exp(s - m_p[..., None]), 0.0)
    l_p = e.sum(axis=-1)
    acc_p = jnp.einsum("bkgtpc,bkpcjd->bkgtpjd", e, v6, precision=hi)
    m = m_p.max(axis=-1)  # merge the rows' partial softmaxes
    scale = jnp.exp(m_p - m[..., None])
    acc = (acc_p * scale[..., None, None]).sum(axis=4)  # (B, K, G, T, J, d)
    o = acc / (l_p * scale).sum(-1)[..., None, None]
    o = rearrange(o, "b k g t j d -> b k g t (j d)")[..., np.flatnonzero(di.ravel() < h)]
    o = rearrange(o, "b k g t h -> b t (k g) h").astype(q_btnh.dtype)
    return [o, k_bksh, v_bksh]


def _bind(eqn, invals):
    """Evaluate one equation as it was traced (JAX versions differ in get_bind_params)."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        subfuns, params = got
    else:
        subfuns, params = (), got
    return eqn.primitive.bind(*subfuns, *invals, **params)


def interpret(jaxpr: jcore.Jaxpr, consts, args, placed: dict[int, Any]) -> list[Any]:
    """Evaluate `jaxpr`, equations listed in `placed` by the rule given there."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        if i in placed:
            outs = placed[i](eqn, invals)
        else:
            outs = _bind(eqn, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def build_rules(graph, tilings: dict[str, Tiling], host: dict[str, str]) -> dict[int, Any]:
    """Equation index -> the placed computation replacing it."""
    rules: dict[int, Any] = {}
    by_name = {o.name: o for o in graph.ops}
    for o in graph.ops:
        if o.kind == "matvec":
            rules[o.eqns[0]] = (lambda op, t: lambda e, v: [tiled_matvec(e, v, op, t)])(
                o, tilings[o.name])
        elif o.kind == "lookup":
            owner = by_name[host[o.name]]
            rules[o.eqns[0]] = (lambda op, ow, t: lambda e, v: [tiled_lookup(e, v, op, ow, t)])(
                o, owner, tilings[owner.name])
        elif o.kind == "attention":  # each kv head's cache is spread over its cores
            t = tilings[o.name]
            rules[o.eqns[0]] = (lambda r, c: lambda e, v: sharded_attention(v, r, c))(
                t.pr, t.pc // o.heads[1])
    return rules


def make_step(graph, tilings, host):
    """A jitted step(leaves, tokens, positions, cache) -> (logits, cache) for `graph`'s
    cache length (the jaxpr's shapes are fixed)."""
    closed = graph.jaxpr
    rules = build_rules(graph, tilings, host)

    @jax.jit
    def step(leaves, tokens_bt, positions_bt, cache):
        args = jax.tree.leaves((leaves, tokens_bt, positions_bt, cache))
        logits, *cache_leaves = interpret(closed.jaxpr, closed.consts, args, rules)
        return logits, jax.tree.unflatten(jax.tree.structure(cache), cache_leaves)

    return step


# ---- running a plan ----------------------------------------------------------------------

def leaves(plan, params: Any) -> list[jax.Array]:
    """A plan's parameters in the traced step's argument order, from a flat dict
    {name: array}, a Transformer or a loaded SparkModel."""
    from spark_model.checkpoint import flat_params

    if hasattr(params, "tokenizer") and hasattr(params, "model"):  # a SparkModel
        params = params.model
    if not isinstance(params, dict):
        params = flat_params(params)
    missing = [n for n in plan.graph.param_order if n not in params]
    if missing:
        raise ValueError(f"parameters missing for this plan: {missing[:5]}")
    out = []
    for n in plan.graph.param_order:
        info = plan.graph.params[n]
        a = jnp.asarray(params[n])
        if tuple(a.shape) != info.shape:
            raise ValueError(f"parameter {n} has shape {tuple(a.shape)}, the plan was "
                             f"compiled for {info.shape}")
        out.append(a.astype(info.dtype))
    return out


class Runner:
    """Runs a compiler.plan.Plan's decode step, one token at a time, or a verify step of
    up to MAX_VERIFY_ROWS tokens at consecutive positions (the k-row products on the same
    placed tiles that speculative decoding checks drafts with); keeps the jitted step of
    each cache length and row count it has seen, so a loop of calls traces once."""

    def __init__(self, plan):
        self.plan = plan
        self._steps: dict[tuple[int, int], Any] = {}

    def _step(self, cache_len: int, rows: int):
        if (cache_len, rows) not in self._steps:
            g = frontend.build_graph(self.plan.cfg, cache_len, rows=rows)
            tilings = {name: r.tiling for name, r in self.plan.regions.items()}
            self._steps[cache_len, rows] = make_step(g, tilings, self.plan.host)
        return self._steps[cache_len, rows]

    def __call__(self, params: Any, tokens_bt, positions_bt, cache):
        """One step through the placed program: (logits (B, T, V), new cache).

        tokens and positions are (1, T): one sequence, T = 1 for a decode step or up to
        MAX_VERIFY_ROWS tokens at consecutive positions for a verify step. `params` as
        for `leaves` (or the list it returns); `cache` is a spark_model KVCache of any
        capacity, which the attention op spreads over the cores of its region.
        """
        params = params if isinstance(params, list) else leaves(self.plan, params)
        tokens = jnp.asarray(tokens_bt, jnp.int32)
        positions = jnp.asarray(positions_bt, jnp.int32)
        if (tokens.ndim != 2 or tokens.shape[0] != 1 or positions.shape != tokens.shape
                or not 1 <= tokens.shape[1] <= MAX_VERIFY_ROWS):
            raise ValueError("a plan runs one sequence of 1 to "
                             f"{MAX_VERIFY_ROWS} tokens: tokens and positions must be "
                             f"(1, T), got {tokens.shape} and {positions.shape}")
        rows = tokens.shape[1]
        p = np.asarray(positions_bt).reshape(-1)
        if rows > 1 and np.any(np.diff(p) != 1):
            raise ValueError(f"a verify step's positions must be consecutive, got {p.tolist()}")
        return self._step(cache.length, rows)(params, tokens, positions, cache)


def execute(plan, params: Any, tokens_bt, positions_bt, cache):
    """One decode step of `plan` (see Runner.__call__; a Runner reuses its traced step
    across calls, this traces afresh)."""
    return Runner(plan)(params, tokens_bt, positions_bt, cache)


def generate_greedy(plan, params: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                    capacity: int = 2048) -> list[int]:
    """Greedy decoding through the executed plan, one token per step."""
    from spark_model.kv_cache import init_cache

    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt must hold at least one token")
    if len(ids) + max_new_tokens > capacity:
        raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the capacity {capacity}")
    run = Runner(plan)
    weights = leaves(plan, params)
    cache = init_cache(plan.cfg, 1, capacity)
    out: list[int] = []
    for pos in range(len(ids) + max_new_tokens - 1):
        tok = ids[pos] if pos < len(ids) else out[-1]
        logits, cache = run(weights, [[tok]], [[pos]], cache)
        if pos >= len(ids) - 1:
            out.append(int(jnp.argmax(logits[0, -1])))
    return out
