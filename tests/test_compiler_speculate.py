"""Speculative decoding on the wafer: the verify step of k rows, priced by the cost model
and run by the placed program, and the tokens/s it gives at an acceptance rate."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import compiler
import spark_model
from compiler import cost, speculate
from compiler.execute import Runner, leaves
from compiler.ir import CompilerError
from compiler.verify import DEFAULT_PROMPT, logit_diffs, model_step, verify_step_diffs
from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.cli import main as spark_main
from spark_model.kv_cache import init_cache

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints" / "spark-tiny"
GRID = "grid:64x64:48KB"


@pytest.fixture(scope="module")
def plans():
    """The overlay on the whole grid, and one layer per set of regions (hand-offs)."""
    return [compiler.compile("tiny", GRID, context=4096),
            compiler.compile("tiny", GRID, context=4096, layers_per_region=1)]


@pytest.fixture(scope="module")
def small():
    """An untied model with q/k/v biases on a grid where every K is split over rows."""
    cfg = ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=6, n_kv_heads=3,
                      head_dim=8, d_ff=80, tie_embeddings=False, attn_bias=True,
                      rope_theta=500_000.0, rope_scaling=RopeScaling())
    return init_model(cfg, seed=3), compiler.compile(cfg, "grid:12x10:8KB", context=512)


# ---- the cost model --------------------------------------------------------------------

@pytest.mark.parametrize("context", [1, 1024, 3000, 4096])
def test_one_row_verify_step_is_the_decode_step(plans, context):
    for plan in plans:
        one = cost.plan_step(plan, context)
        ver = cost.plan_step(plan, context, 1, verify=True)
        assert ver.total == one.total and ver.link_bound_cycles == one.link_bound_cycles
        assert ver.ops == one.ops
    # and the speculation table's k = 1 is the decode speed `spark compile` prints
    plan = plans[0]
    s = speculate.speculation(plan, 4, 0.5)
    assert s["contexts"] == [1024]
    assert s["table"][0]["tokens_per_s"]["1024"] == plan.predictions[
        "decode_tokens_per_s"]["1024"]


def test_k_rows_cost_more_but_less_than_k_steps(plans):
    for plan in plans:
        for context in (1024, 4000):
            one = cost.plan_step(plan, context).total
            prev = one.total
            for k in range(2, speculate.MAX_ROWS + 1):
                c = cost.plan_step(plan, context, k, verify=True).total
                assert prev < c.total < k * one.total  # monotonic; weights and latency shared
                prev = c.total
                # paid once per step: hops, routing stages, the inter-wafer link
                assert (c.hops, c.stages, c.wafer) == (one.hops, one.stages, one.wafer)
                # k rows of MACs and of activation bytes; attention's extra k(k-1)/2
                # query-positions add a little, per-row rounding takes a little
                assert 0.98 * k * one.compute <= c.compute <= 1.05 * k * one.compute
                assert 0.98 * k * one.transfer <= c.transfer <= 1.05 * k * one.transfer


def test_attention_prices_k_queries_after_the_cache(plans):
    """Query i of a verify step sees context + i positions: the scoring work is that of
    the k one-row steps at contexts c, c + 1, ..., c + k - 1 (on a row count that divides
    every such sum)."""
    plan = plans[0]
    op = next(o for o in plan.graph.ops if o.kind == "attention")
    tl = plan.regions[op.name].tiling
    t, act = plan.target, 4
    c, k = 64 * tl.pr, 4
    ver = cost.attention(op, tl, c, act, t, tokens=k, verify=True)
    steps = [cost.attention(op, tl, c + i, act, t) for i in range(k)]
    # compute is linear in positions: the rounding per step differs by < 1 position/row
    assert ver.compute == pytest.approx(sum(s.compute for s in steps), rel=0.01)
    assert ver.hops == steps[0].hops and ver.stages == steps[0].stages


def test_packed_weights_are_expanded_once_per_verify_step():
    plan = compiler.compile("tiny", GRID, context=4096, weights="q4_0")
    op = next(o for o in plan.graph.ops if o.kind == "matvec")
    tl = plan.regions[op.name].tiling
    one = cost.matvec(tl, 4, plan.target, 1, dequant=2.0).compute
    four = cost.matvec(tl, 4, plan.target, 4, dequant=2.0).compute
    mac = tl.tk * tl.tn / plan.target.macs_per_cycle
    assert one == 3 * mac and four == 6 * mac  # 2 expansion slots once, then k MACs


def test_verify_buffers_grow_the_fullest_core(plans):
    plan = plans[0]
    one, eight = speculate.verify_sram(plan, 1), speculate.verify_sram(plan, 8)
    assert one["max_core_bytes"] == int(compiler.core_bytes(plan).max())
    assert eight["max_core_bytes"] > one["max_core_bytes"] and eight["fits"]


# ---- expected tokens per step ----------------------------------------------------------

@pytest.mark.parametrize("a", [0.0, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_expected_tokens_against_monte_carlo(a):
    rng = np.random.default_rng(20)
    n = 200_000
    for drafts in range(0, 8):
        ok = rng.random((n, drafts)) < a  # each draft accepted with probability a
        yielded = np.cumprod(ok, axis=1).sum(axis=1) + 1  # accepted prefix + model's token
        mean, sd = yielded.mean(), yielded.std()
        got = speculate.expected_tokens(a, drafts)
        assert abs(got - mean) <= 5 * sd / math.sqrt(n) + 1e-12, (a, drafts, got, mean)
    assert speculate.expected_tokens(a, 0) == 1.0


def test_tokens_per_s_is_mean_tokens_over_step_time(plans):
    plan = plans[0]
    s = speculate.speculation(plan, 6, 0.7, draft_s=2e-6)
    row = s["table"][5]
    secs = speculate.step_seconds(plan, 6, 1024)
    assert row["tokens_per_s"]["1024"] == pytest.approx(
        (1 - 0.7 ** 6) / 0.3 / (secs + 2e-6), rel=1e-12)
    v = s["by_context"]["1024"]
    assert v["ratio"] == pytest.approx(secs / speculate.step_seconds(plan, 1, 1024))


def test_contexts_leave_room_for_the_last_rows():
    plan = compiler.compile("tiny", GRID, context=1024)
    assert speculate.verify_contexts(plan) == [1024 - 7]


# ---- the placed program runs k rows ----------------------------------------------------

@pytest.mark.parametrize("rows", [pytest.param(2, marks=pytest.mark.slow), 5,
                                  pytest.param(8, marks=pytest.mark.slow)])
def test_placed_verify_step_computes_the_models_rows(small, rows):
    model, plan = small
    ids = [5, 17, 42, 7, 299, 0, 3, 88, 150, 9, 61, 200, 31]
    if rows == 5:
        ids = ids[:10]  # two full steps: one traced shape keeps the quick case quick
    diffs = verify_step_diffs(plan, model, ids, rows, capacity=256)
    assert len(diffs) == -(-len(ids) // rows) and max(diffs) < 1e-4


@pytest.mark.slow
def test_verify_step_rows_match_one_row_steps(small):
    """Row i of a k-row step is the one-row step at that position (the placed program
    against itself fed one token at a time), and the caches agree after it."""
    model, plan = small
    run, w = Runner(plan), leaves(plan, model)
    ids = [11, 4, 250, 63, 8, 120]
    cache1, cachek = init_cache(model.cfg, 1, 64), init_cache(model.cfg, 1, 64)
    rows = []
    for pos, tok in enumerate(ids):
        lg, cache1 = run(w, [[tok]], [[pos]], cache1)
        rows.append(np.asarray(lg[0, 0]))
    lg_k, cachek = run(w, [ids[:2]], [[0, 1]], cachek)  # a 2-row step, then a 4-row one
    lg_k2, cachek = run(w, [ids[2:]], [[2, 3, 4, 5]], cachek)
    got = np.concatenate([np.asarray(lg_k[0]), np.asarray(lg_k2[0])])
    np.testing.assert_allclose(got, np.stack(rows), atol=1e-4)
    np.testing.assert_allclose(np.asarray(cachek.k[1]), np.asarray(cache1.k[1]), atol=1e-5)


@pytest.mark.slow
def test_spark_tiny_verify_step_of_8_rows():
    tiny = spark_model.load(CKPT, capacity=2048)
    plan = compiler.compile(CKPT, GRID, context=4096)
    ids = tiny.tokenizer.encode(DEFAULT_PROMPT)
    diffs = verify_step_diffs(plan, tiny, ids, 8)
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_runner_refuses_bad_rows(small):
    model, plan = small
    cache = init_cache(model.cfg, 1, 64)
    with pytest.raises(ValueError, match="one sequence of 1 to 8 tokens"):
        Runner(plan)(model, [list(range(9))], [list(range(9))], cache)
    with pytest.raises(ValueError, match="one sequence of 1 to 8 tokens"):
        Runner(plan)(model, [[1], [2]], [[0], [1]], cache)
    with pytest.raises(ValueError, match="consecutive"):
        Runner(plan)(model, [[1, 2, 3]], [[0, 2, 3]], cache)


# ---- bad input and the command ---------------------------------------------------------

@pytest.mark.parametrize("rows", [0, 9, -1, 2.5, True, "4"])
def test_bad_rows(rows):
    with pytest.raises(CompilerError, match="verify rows must be an integer from 1 to 8"):
        speculate.check_rows(rows)


@pytest.mark.parametrize("a", [-0.1, 1.01, float("nan"), "high", None])
def test_bad_acceptance(a):
    with pytest.raises(CompilerError, match="acceptance must be"):
        speculate.check_acceptance(a)


def test_cli_prints_the_verify_step(capsys):
    args = ["compile", "--preset", "tiny", "--target", GRID, "--context", "4096"]
    assert spark_main(args + ["--verify-rows", "4", "--acceptance", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "verify step of 4 rows (3 drafts" in out and "2.952 tokens per step" in out
    table = [ln.split() for ln in out.splitlines() if ln.startswith("    ") and
             ln.split()[0].isdigit()]
    assert [int(r[0]) for r in table] == list(range(1, 9))
    assert spark_main(args + ["--verify-rows", "8", "--acceptance", "0.5", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["speculation"]
    assert s["rows"] == 8 and len(s["table"]) == 8
    assert s["by_context"]["1024"]["one_row_s"] == s["table"][0]["step_s"]["1024"]


@pytest.mark.parametrize("extra, message", [
    (["--verify-rows", "0", "--acceptance", "0.5"], "--verify-rows must be from 1 to 8"),
    (["--verify-rows", "9", "--acceptance", "0.5"], "--verify-rows must be from 1 to 8"),
    (["--verify-rows", "4", "--acceptance", "1.5"], "--acceptance must be in [0, 1]"),
    (["--verify-rows", "4", "--acceptance", "-0.2"], "--acceptance must be in [0, 1]"),
    (["--verify-rows", "4"], "--verify-rows needs --acceptance"),
    (["--acceptance", "0.5"], "need --verify-rows"),
    (["--verify-rows", "4", "--acceptance", "0.5", "--draft-us", "-1"], "--draft-us"),
])
def test_cli_bad_speculation_inputs(capsys, extra, message):
    assert spark_main(["compile", "--preset", "tiny", "--target", GRID] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
