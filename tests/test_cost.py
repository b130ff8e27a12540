"""Routing, the PLMR cost model and its calibration, the planner, and the inspection
outputs (plan JSON, pictures, trace, report)."""

import json
from pathlib import Path

import numpy as np
import pytest

import compiler
import spark_model
from compiler import calibrate, cost
from compiler.partition import Tiling
from compiler.summary import summary
from compiler.verify import DEFAULT_PROMPT, logit_diffs

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints" / "spark-tiny"


@pytest.fixture(scope="module")
def plan8b():
    return compiler.compile("llama3-8b", "wse3")


# ---- calibration against measured WSE-2 figures (WaferLLM, OSDI'25) ---------------------

def test_gemv_16k_within_2x_of_wse2_measurement():
    predicted = calibrate.gemv_seconds(16_384, 16_384)
    ratio = predicted / calibrate.GEMV_16K_SECONDS
    assert 0.5 <= ratio <= 2.0, f"predicted {predicted * 1e3:.5f} ms, measured 0.0012 ms"


def test_llama3_8b_decode_within_1_5x_of_wse2_measurement():
    got = calibrate.waferllm_decode("llama3-8b", "wse2", grid=420, context=4096)
    ratio = got["tokens_per_s"] / calibrate.LLAMA3_8B_TOKENS_PER_S
    assert 1 / 1.5 <= ratio <= 1.5, f"predicted {got['tokens_per_s']:.0f} tokens/s, " \
                                    f"measured {calibrate.LLAMA3_8B_TOKENS_PER_S}"


def test_more_cores_do_not_make_decode_faster_without_bound():
    # WaferLLM's Table 4 falls from 420^2 to 660^2 cores: collectives grow with the grid.
    speeds = [calibrate.waferllm_decode(grid=p)["tokens_per_s"] for p in (420, 540, 660)]
    assert speeds[0] > speeds[1] > speeds[2]


# ---- cost model pieces --------------------------------------------------------------------

def test_collective_costs_follow_the_formulas():
    t = compiler.get_target("wse2")
    assert cost.ktree_stages(1) == 0 and cost.ktree_stages(400) == pytest.approx(20.0)
    b = cost.broadcast(10, 40, t)
    assert b.hops == 9 * t.hop_cycles and b.transfer == 40 / t.link_bytes_per_cycle
    r = cost.reduce(100, 8, 2, t, back=True)
    assert r.hops == 100 and r.stages == pytest.approx(10 * t.routing_stage_cycles)
    mv = cost.matvec(Tiling(pr=4, pc=4, k=64, n=32, wbytes=2), 2, t)
    assert mv.compute == 16 * 8 / t.macs_per_cycle


def test_longer_context_and_prefill_cost_more(plan8b):
    s = summary(plan8b)
    tps = s["decode_tokens_per_s"]
    assert set(tps) == {"1024", "32768", "131072"}
    assert tps["1024"] > tps["32768"] > tps["131072"] > 0
    step_1k = 1 / tps["1024"]
    assert s["ttft_s"] > step_1k  # a 1,000-token prefill costs more than one step
    b = s["breakdown"]
    assert {"compute", "hops", "routing_stages", "inter_wafer"} <= set(b)
    assert sum(b.values()) == pytest.approx(1 / tps["131072"], rel=1e-6)


def test_relays_appear_when_routes_exceed_the_limit():
    grid = compiler.get_target("grid:64x64:48KB")
    loose = compiler.compile("tiny", grid, context=2048, layers_per_region=1)
    tight = compiler.compile("tiny", grid.replace(routing_paths=2), context=2048,
                             layers_per_region=1)
    assert loose.routing.relay_stages == 0
    assert tight.routing.cores_over_limit > 0 and tight.routing.relay_stages > 0
    assert summary(tight)["breakdown"]["routing_stages"] > \
        summary(loose)["breakdown"]["routing_stages"]


def test_forced_mapping_and_bad_value():
    plan = compiler.compile("tiny", "grid:64x64:48KB", context=2048, layers_per_region=2)
    assert plan.share == 2 and all(a["layers_per_region"] == 2 for a in plan.alternatives)
    with pytest.raises(compiler.CompilerError, match="layers_per_region"):
        compiler.compile("tiny", "grid:64x64:48KB", context=2048, layers_per_region=9)


def test_link_loads_account_for_a_handoff():
    plan = compiler.compile("tiny", "grid:64x64:48KB", context=2048)
    rt = plan.routing
    assert rt.h_load.min() >= 0 and rt.v_load.min() >= 0
    load, where = rt.max_link
    assert load > 0 and where[3] in ("h", "v")
    for h in rt.handoffs:
        assert h["lanes"] >= 1 and h["hops"] >= 0


# ---- planner ------------------------------------------------------------------------------

def test_planner_keeps_the_fastest_mapping_that_fits(plan8b):
    alts = plan8b.alternatives
    assert len(alts) >= 2
    speeds = [a["decode_tokens_per_s"] for a in alts]
    assert speeds == sorted(speeds, reverse=True)
    assert all(a["wafers"] <= plan8b.target.wafers for a in alts)
    assert plan8b.share == alts[0]["layers_per_region"]


def test_explain_lists_alternatives(capsys):
    from spark_model.cli import main

    assert main(["compile", "--preset", "tiny", "--target", "grid:64x64:48KB", "--context",
                 "2048", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "planner:" in out and "tokens/s" in out


# ---- inspection ---------------------------------------------------------------------------

def test_plan_json_round_trip_and_execution(tmp_path):
    model = spark_model.load(CKPT, capacity=2048)
    plan = compiler.compile(CKPT, "grid:48x40:32KB", context=2048)
    path = compiler.save_json(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "spark-plan/1" and len(data["ops"]) == len(plan.graph.ops)
    again = compiler.load_json(path)
    assert summary(again) == summary(plan)
    ids = model.tokenizer.encode(DEFAULT_PROMPT)[:6]
    assert max(logit_diffs(again, model, ids)) < 1e-4


def test_bad_plan_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(compiler.CompilerError):
        compiler.load_json(p)
    p.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(compiler.CompilerError, match="schema"):
        compiler.load_json(p)


def test_report_writes_pictures_trace_and_summary(tmp_path):
    import matplotlib.image as mpimg

    plan = compiler.compile("tiny", "grid:64x64:48KB", context=2048)
    out = compiler.write_report(plan, tmp_path / "r")
    for name in ("plan.json", "sram.png", "regions.png", "links.png", "trace.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert mpimg.imread(out / "sram.png").ndim == 3
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans if e["cat"] == "compute"} == {o.name for o in plan.graph.ops}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    md = (out / "report.md").read_text()
    assert "| layer |" in md and "decode tokens/s" in md


def test_compile_json_has_the_predictions(capsys):
    from spark_model.cli import main

    assert main(["compile", "--preset", "llama3-8b", "--target", "wse3", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s["decode_tokens_per_s"]) == {"1024", "32768", "131072"}
    assert s["ttft_s"] > 0 and s["wafers"] == 1
    assert np.isclose(sum(s["breakdown"].values()), 1 / s["decode_tokens_per_s"]["131072"])
