"""Speculative decoding on the wafer: what a verify step of k rows costs, and the tokens/s
it buys at a given acceptance.

A verify step feeds k tokens at consecutive positions through the placed program at once:
the last accepted token and k - 1 drafted ones (from prompt lookup or a draft model). It
gives k rows of logits, so it checks the k - 1 drafts and yields the model's own next token
after the last accepted one. k = 1 is plain decoding. The cost model prices it over the
same plan (`cost.step(..., tokens=k, verify=True)`); what changes with k on the wafer:

  weights     stay where they are; every core multiplies its tile by k input rows. A
              packed tile is expanded once per step, whatever k.
  compute     k times the multiply-accumulates. A core is MAC-bound (it fetches both
              operands from its SRAM at the rate it multiplies: WSE-2's two 32-bit
              operands and one MAC per cycle), so reading a weight once for k rows saves
              no cycles, unlike a memory-bound CPU or GPU, where it is the whole gain.
  transfer    k times the activation bytes: every multicast of an input slice, every
              K-tree partial sum, every hand-off between regions, the busiest link's load
              and the new keys and values appended to the cache.
  attention   k queries: query i sees context + i positions, so the scoring and
              weighting work is about k times the one-row step's.
  fixed       hops and routing stages (the collectives' latency across the grid, the
              relays, the inter-wafer latency) are paid once per step, whatever k.

So the k-row step costs less than k one-row steps by the fixed part: on a wafer the
latency of the collectives, not the weight reads, is what verification shares.

The working buffers of a matvec (its input slice and partial sums) and of attention (queries
and accumulators) hold k rows; `verify_sram` says whether the plan's fullest core still
fits its budget with them (the plan is made for one row).

Expected tokens per verify step. Say each of the d = k - 1 drafts is accepted with
probability a, independently, and checking stops at the first draft the model rejects.
A step always yields one token of the model's own (the correction at the first rejected
draft, or the one after the last draft when all pass), plus the accepted drafts. The step
yields more than i tokens exactly when the first i drafts all pass, with probability a^i
(i = 0..d). The mean of a count is the sum over i of P(count > i), so the mean is
1 + a + ... + a^d = (1 - a^(d+1)) / (1 - a), and d + 1 = k when a = 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from compiler import cost
from compiler.cores import core_bytes
from compiler.ir import CompilerError
from compiler.partition import ACC_BYTES
from compiler.plan import Plan

MAX_ROWS = 8  # most tokens a verify step checks at once
CONTEXTS = (1024, 32_768, 131_072)  # as cost.predictions


def check_rows(rows: Any) -> int:
    """A verify step's row count, 1..MAX_ROWS, or a one-line CompilerError."""
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or not (
            1 <= rows <= MAX_ROWS):
        raise CompilerError(f"verify rows must be an integer from 1 to {MAX_ROWS}, got {rows!r}")
    return int(rows)


def check_acceptance(a: Any) -> float:
    """A per-draft acceptance probability in [0, 1], or a one-line CompilerError."""
    try:
        a = float(a)
    except (TypeError, ValueError):
        raise CompilerError(f"acceptance must be a number in [0, 1], got {a!r}") from None
    if not 0.0 <= a <= 1.0:  # also refuses NaN
        raise CompilerError(f"acceptance must be in [0, 1], got {a}")
    return a


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Mean tokens one verify step yields: `drafts` drafts, each accepted with probability
    `acceptance` until the first rejection, plus the model's own token (derived in the
    module's docstring)."""
    a = check_acceptance(acceptance)
    if drafts < 0:
        raise CompilerError(f"drafts must be >= 0, got {drafts}")
    if a == 1.0:
        return float(drafts + 1)
    return (1.0 - a ** (drafts + 1)) / (1.0 - a)


def verify_contexts(plan: Plan) -> list[int]:
    """Filled positions at which verify steps are priced: those of cost.predictions, less
    the room a MAX_ROWS-row step needs (its last query sits MAX_ROWS - 1 positions on)."""
    room = plan.context - (MAX_ROWS - 1)
    if room < 1:
        raise CompilerError(f"a {MAX_ROWS}-row verify step needs a context of at least "
                            f"{MAX_ROWS} positions; the plan holds {plan.context}")
    got = [c for c in CONTEXTS if c <= plan.context] or [plan.context]
    return sorted({min(c, room) for c in got})


def step_seconds(plan: Plan, rows: int, context: int) -> float:
    """Predicted seconds of a verify step of `rows` rows after `context` filled positions
    (rows = 1: exactly the one-row decode step of cost.predictions)."""
    return cost.plan_step(plan, context, check_rows(rows), verify=True).seconds(plan.target)


def verify_sram(plan: Plan, rows: int) -> dict[str, Any]:
    """The fullest core's bytes with every working buffer holding `rows` rows: each
    tiling's buffers on its fullest core (split between the layers sharing its region, as
    the plan counts them) grow by rows - 1 times, on every core of its region."""
    rows = check_rows(rows)
    used = core_bytes(plan).astype(np.int64)
    extra: dict[tuple, int] = defaultdict(int)
    for r in plan.regions.values():
        tl = r.tiling
        per = (-(-ACC_BYTES * (tl.tk + tl.tn) // tl.share) if tl.k
               else -(-tl.buffers // tl.share))
        extra[(r.wafer, r.row, r.col, r.rows, r.cols)] += (rows - 1) * per
    for (w, r0, c0, nr, nc), b in extra.items():
        used[w, r0:r0 + nr, c0:c0 + nc] += b
    t = plan.target
    top = int(used.max()) if used.size else 0
    return {"rows": rows, "max_core_bytes": top, "sram_max_fraction": top / t.sram_bytes,
            "fits": top <= t.core_budget, "budget_bytes": t.core_budget}


def speculation(plan: Plan, rows: int, acceptance: float, draft_s: float = 0.0
                ) -> dict[str, Any]:
    """Predicted one-row and `rows`-row steps, their ratio, and tokens/s at `acceptance`
    (mean tokens per step over the verify step plus `draft_s` seconds of drafting, about 0
    for prompt lookup), at each of verify_contexts; and a table over k = 1..MAX_ROWS."""
    rows, a = check_rows(rows), check_acceptance(acceptance)
    if not draft_s >= 0.0:
        raise CompilerError(f"draft time must be >= 0 seconds, got {draft_s}")
    contexts = verify_contexts(plan)
    table = []
    for k in range(1, MAX_ROWS + 1):
        mean = expected_tokens(a, k - 1)
        secs = {str(c): step_seconds(plan, k, c) for c in contexts}
        table.append({"rows": k, "tokens_per_step": mean, "step_s": secs,
                      "tokens_per_s": {c: mean / (s + draft_s) for c, s in secs.items()}})
    one, chosen = table[0], table[rows - 1]
    by_context = {}
    for c in map(str, contexts):
        by_context[c] = {
            "one_row_s": one["step_s"][c], "verify_s": chosen["step_s"][c],
            "ratio": chosen["step_s"][c] / one["step_s"][c],
            "plain_tokens_per_s": one["tokens_per_s"][c],
            "tokens_per_s": chosen["tokens_per_s"][c],
            "speedup": chosen["tokens_per_s"][c] / one["tokens_per_s"][c]}
    last = contexts[-1]
    sc = cost.plan_step(plan, last, rows, verify=True)
    return {"rows": rows, "drafts": rows - 1, "acceptance": a, "draft_s": draft_s,
            "tokens_per_step": chosen["tokens_per_step"], "contexts": contexts,
            "by_context": by_context, "table": table,
            "breakdown": cost.breakdown(sc, plan.target), "sram": verify_sram(plan, rows)}


def format_speculation(s: dict[str, Any]) -> str:
    """The lines `spark compile --verify-rows K --acceptance A` adds."""
    lines = [f"  speculative     verify step of {s['rows']} rows ({s['drafts']} drafts + the "
             f"last token), acceptance {s['acceptance']:g} per draft: "
             f"{s['tokens_per_step']:.3f} tokens per step; drafting "
             f"{s['draft_s'] * 1e6:g} us (predicted, batch 1)"]
    for c, v in s["by_context"].items():
        lines.append(
            f"    at {int(c):>7,}   one row {v['one_row_s'] * 1e6:8.2f} us, {s['rows']} rows "
            f"{v['verify_s'] * 1e6:8.2f} us ({v['ratio']:.2f}x); "
            f"{v['plain_tokens_per_s']:,.0f} -> {v['tokens_per_s']:,.0f} tokens/s "
            f"({v['speedup']:.2f}x)")
    m = s["sram"]
    lines.append(f"    SRAM          fullest core with {s['rows']}-row buffers "
                 f"{m['sram_max_fraction']:.1%} ({'fits' if m['fits'] else 'OVER'} the "
                 f"{m['budget_bytes']:,} B budget)")
    b = s["breakdown"]
    total = sum(b.values()) or 1.0
    lines.append(f"    {s['rows']}-row step    " + ", ".join(
        f"{k} {v * 1e6:.1f} us ({v / total:.0%})" for k, v in b.items())
        + f" at {s['contexts'][-1]:,}")
    head = "    k  tokens/step" + "".join(
        f"   step us @{int(c):,}  tokens/s" for c in s["contexts"])
    lines.append(head)
    for r in s["table"]:
        lines.append(f"    {r['rows']}  {r['tokens_per_step']:11.3f}" + "".join(
            f"   {r['step_s'][str(c)] * 1e6:{len(f'step us @{int(c):,}') - 1}.2f}"
            f"  {r['tokens_per_s'][str(c)]:8,.0f}" for c in s["contexts"]))
    return "\n".join(lines)
