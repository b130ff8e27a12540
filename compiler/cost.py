"""PLMR cost model: predicted decode latency of a plan, op by op, along the critical path.

WaferLLM's PLMR device model (OSDI'25) with its four terms: Parallelism (every core of a
region works at once, so an op costs its slowest core), Latency (alpha per hop plus beta per
software routing stage), Memory (what fits is the plan's business; here only its effect on
tile sizes) and Routing (relay stages where a router holds too many routes, from
`route.py`). Every constant comes from the target (`target.py` says where each figure comes
from); nothing here is fitted to a measurement.

Costs are in cycles of the target's clock, split into components:
  compute   the slowest core's multiply-accumulates / macs_per_cycle
  hops      hops x hop_cycles on the critical path
  stages    routing stages x routing_stage_cycles
  transfer  bytes / link_bytes_per_cycle of the messages on the critical path
  wafer     the inter-wafer link: latency + bytes / bandwidth

Collectives (WaferLLM section 6):
  broadcast over n cores in a line: one hardware multicast route, n - 1 hops.
  reduce over n cores: the K-tree with K = 2: (K/2) n^(1/K) routing stages, n/2 hops to the
  root; an allreduce adds the broadcast back (n hops in all, as the paper counts).
A matvec over pr x pc cores: broadcast each K-slice along its row, multiply, reduce each
column's partial sums (MeshGEMV). Attention over a head's cores: broadcast the query,
score and weight the local positions, allreduce the softmax max and sum and reduce the
weighted values. Prefill of n tokens keeps the weights stationary and streams n-row blocks
through the same collectives (a MeshGEMM-style estimate). A verify step of k rows
(verify=True, compiler.speculate) prices the same way with k queries after the cache: k
times the MACs and activation bytes, hops and routing stages once.

`step` prices a placement given directly (graph, hosts, regions, target), routed or not, so
the planner prices candidates with it; `plan_step` and `predictions` price a
compiler.plan.Plan over its routing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from compiler.ir import Graph, Op
from compiler.partition import Tiling
from compiler.place import Region, anchor, handoff_pairs
from compiler.route import Routing, lanes, routing_of
from compiler.target import Target

COMPONENTS = ("compute", "hops", "stages", "transfer", "wafer")
K_TREE = 2  # WaferLLM's K

# ASSUMED (no public figure): extra SIMD operations per weight, in multiply-accumulate
# slots, for a core to turn packed weights into the 16-bit operands its MACs take. A
# packed tile stays packed in SRAM (that is what lets it fit), so every decode step
# expands it again. q8_0: one int8 -> fp16 conversion per weight; q4_0 and q4_1: a
# nibble unpack (shift or mask) and the conversion. The f16 scale multiplies a block's
# partial sum once per 32 weights, and q4_1's minimum adds min x sum(x over the block),
# a sum made once per input slice and shared by every column: both are left out (1/32
# of a slot per weight, or less). Dense weights cost nothing extra. A prefill expands
# each tile once and reuses it for every token of the prompt.
DEQUANT_OPS_PER_WEIGHT = {"q8_0": 1.0, "q4_0": 2.0, "q4_1": 2.0}


@dataclasses.dataclass
class Cost:
    """Cycles by component."""

    compute: float = 0.0
    hops: float = 0.0
    stages: float = 0.0
    transfer: float = 0.0
    wafer: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.hops + self.stages + self.transfer + self.wafer

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, c) + getattr(other, c) for c in COMPONENTS))

    def seconds(self, t: Target) -> dict[str, float]:
        return {c: getattr(self, c) / t.clock_hz for c in COMPONENTS}


def ktree_stages(n: int) -> float:
    """Routing stages on the critical path of a K-tree reduction over n cores in a line."""
    return 0.0 if n <= 1 else K_TREE / 2 * n ** (1 / K_TREE)


def broadcast(n: int, nbytes: float, t: Target) -> Cost:
    if n <= 1:
        return Cost()
    return Cost(hops=(n - 1) * t.hop_cycles, transfer=nbytes / t.link_bytes_per_cycle)


def reduce(n: int, elems: float, act_bytes: int, t: Target, back: bool = False) -> Cost:
    """K-tree reduction of `elems` values over n cores (an allreduce with back=True)."""
    if n <= 1:
        return Cost()
    s = ktree_stages(n)
    # At each stage the partial sums stream in and are added as they arrive (a core's
    # instructions can take fabric input as an operand), so a stage costs its routing
    # overhead plus the message's transfer time.
    return Cost(hops=(n if back else n / 2) * t.hop_cycles,
                stages=s * t.routing_stage_cycles,
                transfer=s * elems * act_bytes / t.link_bytes_per_cycle)


def matvec(tl: Tiling, act_bytes: int, t: Target, tokens: int = 1,
           replicated: bool = False, dequant: float = 0.0) -> Cost:
    """MeshGEMV on pr x pc cores (tokens > 1: k-row products, for a prefill or a verify
    step: k times the MACs and the bytes, the same hops and routing stages).

    dequant: extra operations per weight to expand a packed tile before its products
    (DEQUANT_OPS_PER_WEIGHT; once per step, whatever the number of tokens).

    replicated=False: the input arrives at the region and is multicast along its rows, and
    the partial sums are reduced to the column roots. replicated=True (WaferLLM's chain of
    GEMVs over one grid): the input is already on every row, left there by the previous
    product's allreduce, which broadcasts its result back.
    """
    c = Cost(compute=(tokens + dequant) * tl.tk * tl.tn / t.macs_per_cycle)
    if replicated:
        return c + reduce(tl.pr, tokens * tl.tn, act_bytes, t, back=True)
    return (broadcast(tl.pc, tokens * tl.tk * act_bytes, t) + c
            + reduce(tl.pr, tokens * tl.tn, act_bytes, t))


def attention(op: Op, tl: Tiling, context: int, act_bytes: int, t: Target,
              tokens: int = 1, verify: bool = False) -> Cost:
    """One layer's attention at `context` filled positions over a kv head's pr x cols
    cores (positions over rows, dimensions over columns). tokens > 1: causal prefill, or
    with verify=True a verify step: `tokens` queries after the cache, query i seeing
    context + i positions (i = 0 is the one-row step's query)."""
    n, k, h = op.heads
    g = n // k
    cols = tl.pc // k
    dh = math.ceil(h / cols)
    if tokens == 1 or verify:
        # query-position pairs on the fullest row (tokens = 1: its filled positions)
        p = math.ceil((tokens * context + tokens * (tokens - 1) // 2) / tl.pr)
    else:  # causal: query i sees i + 1 keys, spread over the rows
        p = math.ceil(tokens * (tokens + 1) / 2 / tl.pr)
    q = broadcast(tl.pr, tokens * g * dh * act_bytes, t)  # down each column
    scores = Cost(compute=p * g * dh / t.macs_per_cycle) + reduce(cols, p * g, 4, t, back=True)
    softmax = Cost(compute=p * g / t.macs_per_cycle) + reduce(tl.pr, 2 * tokens * g, 4, t,
                                                              back=True)
    values = Cost(compute=p * g * dh / t.macs_per_cycle) + reduce(tl.pr, tokens * g * dh, 4, t)
    append = Cost(hops=t.hop_cycles, transfer=2 * tokens * dh * act_bytes
                  / t.link_bytes_per_cycle)
    return q + scores + softmax + values + append


def vector(op: Op, host: Tiling, act_bytes: int, t: Target, tokens: int = 1) -> Cost:
    """Element-wise work spread over the host region's columns; norms add an allreduce of
    their sum of squares along the row."""
    elems = tokens * op.out_bytes / act_bytes
    c = Cost(compute=4 * elems / max(host.pc, 1) / t.macs_per_cycle)
    if "norm" in op.roles:
        c = c + reduce(host.pc, tokens, 4, t, back=True)
    return c


def lookup(op: Op, tl: Tiling, act_bytes: int, t: Target, tokens: int = 1,
           dequant: float = 0.0) -> Cost:
    """The table row leaves the core row (or column) that holds it, expanded from its
    packed blocks first (`dequant` operations per weight, the row spread over the
    columns of the cores that hold it)."""
    spread = tl.pr if op.shares else tl.pc  # a tied table's row is a column of (D, V)
    row = tokens * dequant * -(-op.n // max(spread, 1))
    return Cost(compute=row / t.macs_per_cycle, hops=max(tl.pr, tl.pc) * t.hop_cycles,
                transfer=tokens * op.n * act_bytes / t.link_bytes_per_cycle)


def handoff(hops: int, relays: int, nbytes: float, wafers: int, t: Target,
            lanes: int = 1) -> Cost:
    """An op's output moving to the next op's region over `lanes` parallel routes (the
    output is spread over the source's columns, the input over the destination's rows)."""
    c = Cost(hops=hops * t.hop_cycles, stages=relays * t.routing_stage_cycles,
             transfer=nbytes / max(lanes, 1) / t.link_bytes_per_cycle)
    if wafers:
        c = c + Cost(wafer=abs(wafers) * (t.wafer_link_latency_s
                                          + nbytes / t.wafer_link_bytes_per_s) * t.clock_hz)
    return c


# ---- a whole step ----------------------------------------------------------------------

def op_cost(op: Op, regions: dict[str, Region], host: dict[str, str], target: Target,
            act: int, context: int, tokens: int = 1, verify: bool = False) -> Cost:
    """One op's own cost on the region that runs it (activations of `act` bytes);
    `tokens` rows of a prefill, or of a verify step with verify=True (see `attention`)."""
    t = target
    if op.kind == "matvec":
        # An input made on the same cores is already replicated along the rows (the
        # producer's allreduce broadcast it back); one from elsewhere is multicast in.
        here = anchor(regions, op.name)
        replicated = bool(op.inputs) and all(
            anchor(regions, host[i]) == here for i in op.inputs)
        c = matvec(regions[op.name].tiling, act, t, tokens, replicated,
                   DEQUANT_OPS_PER_WEIGHT.get(op.weight_dtype, 0.0))
        r, a = regions[op.name], regions[here]
        if replicated and (r.row, r.rows) != (a.row, a.rows):
            # A band of rows within the shared cores (packed weights on the overlay): the
            # input, replicated over the anchor's rows, is multicast down the columns
            # spanning both bands to reach it.
            span = max(r.row + r.rows, a.row + a.rows) - min(r.row, a.row)
            c = c + broadcast(span, tokens * r.tiling.tk * act, t)
        return c
    if op.kind == "attention":
        return attention(op, regions[op.name].tiling, context, act, t, tokens, verify)
    if op.kind == "lookup":
        return lookup(op, regions[host[op.name]].tiling, act, t, tokens,
                      DEQUANT_OPS_PER_WEIGHT.get(op.weight_dtype, 0.0))
    return vector(op, regions[host[op.name]].tiling, act, t, tokens)


@dataclasses.dataclass
class StepCost:
    """A decode step (or a prefill) along its critical path."""

    total: Cost  # the critical path, by component
    ops: dict[str, Cost]  # each op's own cost
    start: dict[str, float]  # cycle each op starts
    finish: dict[str, float]
    link_bound_cycles: float  # busiest link's bytes / bandwidth (a lower bound)

    def seconds(self, t: Target) -> float:
        return max(self.total.total, self.link_bound_cycles) / t.clock_hz


def step(g: Graph, host: dict[str, str], regions: dict[str, Region], target: Target,
         act: int, context: int, routing: Routing | None = None, tokens: int = 1,
         verify: bool = False) -> StepCost:
    """Earliest start of every op given its inputs' finish plus their hand-offs; the
    step's latency is the finish of the last op. Without `routing` (while planning), the
    hand-offs go straight between region centres with no relays and no link bound.
    tokens > 1: a prefill of that many tokens, or with verify=True a verify step of that
    many rows after `context` filled positions (compiler.speculate)."""
    t = target
    by_pair: dict[tuple[str, str], dict] = {}
    handoffs = (routing.handoffs if routing is not None
                else _direct_handoffs(g, host, regions, target))
    for h in handoffs:
        by_pair.setdefault((h["src"], h["dst"]), h)

    path: dict[str, Cost] = {}
    own: dict[str, Cost] = {}
    start: dict[str, float] = {}
    finish: dict[str, float] = {}
    by_name = {o.name: o for o in g.ops}
    for o in g.ops:
        own[o.name] = op_cost(o, regions, host, t, act, context, tokens, verify)
        best = Cost()
        for i in o.inputs:
            sa = anchor(regions, host[i])
            da = anchor(regions, host[o.name])
            h = by_pair.get((sa, da))
            move = Cost() if h is None else handoff(
                h["hops"], h["relays"], tokens * by_name[i].out_bytes, h["wafers"], t,
                min(lanes(regions, host, by_name[i], "out"), lanes(regions, host, o, "in")))
            cand = path[i] + move
            if cand.total > best.total:
                best = cand
        start[o.name] = best.total
        path[o.name] = best + own[o.name]
        finish[o.name] = path[o.name].total
    last = g.ops[-1].name
    load = routing.max_link[0] if routing is not None else 0.0
    return StepCost(path[last], own, start, finish,
                    tokens * max(load, 0.0) / t.link_bytes_per_cycle)


def _direct_handoffs(g: Graph, host: dict[str, str], regions: dict[str, Region],
                     target: Target) -> list[dict]:
    """Hand-offs between region centres without routing (no relays): for quick estimates
    while planning."""
    out = []
    for _, _, sa, da in handoff_pairs(g, host, regions):
        a, b = regions[sa], regions[da]
        (ra, ca), (rb, cb) = a.center, b.center
        hops = (abs(ra - rb) + abs(ca - cb) if a.wafer == b.wafer
                else target.cols - 1 - ca + cb)
        out.append({"src": sa, "dst": da, "hops": hops, "relays": 0,
                    "wafers": b.wafer - a.wafer})
    return out


# ---- a plan's predictions ------------------------------------------------------------------

def plan_step(plan, context: int | None = None, tokens: int = 1,
              verify: bool = False) -> StepCost:
    """The critical path of one decode step of a compiler.plan.Plan with `context`
    positions filled (default: its capacity; tokens > 1: a prefill of that many tokens,
    or with verify=True a verify step of that many rows), over the plan's routing
    (routed here if the plan has none)."""
    return step(plan.graph, plan.host, plan.regions, plan.target,
                np.dtype(plan.cfg.dtype).itemsize, context or plan.context, routing_of(plan),
                tokens, verify)


def breakdown(sc: StepCost, t: Target) -> dict[str, float]:
    """Seconds per token on the critical path: compute, hops, routing stages, link
    transfer and the inter-wafer link; a link-bound step adds the rest as 'link_bound'."""
    sec = sc.total.seconds(t)
    out = {"compute": sec["compute"], "hops": sec["hops"], "routing_stages": sec["stages"],
           "transfer": sec["transfer"], "inter_wafer": sec["wafer"]}
    extra = sc.seconds(t) - sc.total.total / t.clock_hz
    if extra > 0:
        out["link_bound"] = extra
    return out


def predictions(plan, prompt_tokens: int = 1000) -> dict[str, Any]:
    """Predicted decode speed at 1K, 32K and 128K (those within the plan's context),
    time to first token for a `prompt_tokens` prompt, and where the time goes."""
    t = plan.target
    routing = routing_of(plan)
    act = np.dtype(plan.cfg.dtype).itemsize

    def at(context, tokens=1):
        return step(plan.graph, plan.host, plan.regions, t, act, context, routing, tokens)

    contexts = [c for c in (1024, 32_768, 131_072) if c <= plan.context] or [plan.context]
    speed, by_context = {}, {}
    for c in contexts:
        sc = at(c)
        speed[str(c)] = 1.0 / sc.seconds(t)
        by_context[str(c)] = breakdown(sc, t)
    n = min(prompt_tokens, plan.context)
    prefill = at(n, tokens=n)
    return {"decode_tokens_per_s": speed, "ttft_s": prefill.seconds(t),
            "ttft_prompt_tokens": n, "breakdown": by_context[str(contexts[-1])],
            "breakdown_by_context": by_context, "routing": routing.summary()}
