"""The wafer-mapping compiler: targets, the traced IR, tiling, placement, and the proof that
the placed program computes the model's own logits."""

import json
from pathlib import Path

import numpy as np
import pytest

import compiler
import spark_model
from compiler import frontend
from compiler.partition import tile_weight
from compiler.place import pack, pack_overlay
from compiler.summary import summary
from compiler.verify import DEFAULT_PROMPT, logit_diffs
from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.checkpoint import flat_params, load_config
from spark_model.cli import main as spark_main
from spark_model.transformer import abstract_model

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints" / "spark-tiny"
GRID = "grid:64x64:48KB"


@pytest.fixture(scope="module")
def tiny():
    return spark_model.load(CKPT, capacity=2048)


@pytest.fixture(scope="module")
def tiny_plan():
    return compiler.compile(CKPT, GRID, context=4096)


# ---- targets ---------------------------------------------------------------------------

def test_target_presets_and_grid_specs():
    wse3 = compiler.get_target("wse3")
    assert (wse3.rows, wse3.cols, wse3.sram_bytes) == (762, 1172, 48 * 1024)
    assert compiler.get_target("WSE2").cores == 757 * 996
    g = compiler.get_target("grid:16x32:1MB", wafers=3)
    assert (g.rows, g.cols, g.sram_bytes, g.wafers) == (16, 32, 1 << 20, 3)
    assert compiler.get_target("grid:8x8").sram_bytes == 48 * 1024


@pytest.mark.parametrize("spec", ["grid:0x64", "grid:64x0:48KB", "grid:8x8:-1KB",
                                  "grid:8x8:0B", "grid:axb", "wse9", "", "grid:8x8:48XB"])
def test_bad_targets_are_named(spec):
    with pytest.raises(compiler.TargetError):
        compiler.get_target(spec)


def test_bad_target_fields():
    with pytest.raises(compiler.TargetError, match="reserve_fraction"):
        compiler.get_target("wse3").replace(reserve_fraction=1.0)
    with pytest.raises(compiler.TargetError, match="wafers"):
        compiler.get_target("wse3", wafers=0)


# ---- frontend --------------------------------------------------------------------------

def _kinds(g):
    return [o.kind for o in g.ops]


def test_ir_lists_every_parameter_once_in_execution_order():
    cfg = ModelConfig.preset("tiny")
    g = frontend.build_graph(cfg)
    names = set(flat_params(abstract_model(cfg)))
    assert set(g.params) == names and set(g.owner()) == names
    order = list(g.params)
    assert order[0] == "embed" and order[-1] == "final_norm.scale"
    assert order.index("blocks.0.attn.q") < order.index("blocks.0.mlp.down") \
        < order.index("blocks.1.attn_norm.scale")
    kinds = _kinds(g)
    assert kinds.count("attention") == cfg.n_layers
    assert kinds.count("matvec") == 7 * cfg.n_layers + 1  # q k v o gate up down, tied head
    head = g.ops[-1]
    assert head.kind == "matvec" and head.weight == "embed" and head.transposed
    assert g.op("embed.lookup").shares == "embed"
    q = g.op("blocks.0.attn.q")
    assert (q.k, q.n) == (cfg.d_model, cfg.n_heads * cfg.head_dim)
    assert g.op("blocks.0.attn_norm").roles == ("norm",)
    assert g.op("blocks.0.mlp_norm").roles == ("residual", "norm")
    assert g.op("blocks.0.attn.rotary").roles == ("rotary",)
    assert g.op("blocks.0.mlp.activation").roles == ("activation",)
    assert g.op("final_norm").roles == ("residual", "norm")


def test_a_changed_model_needs_no_compiler_change():
    cfg = ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3,
                      head_dim=8, d_ff=80, tie_embeddings=False,
                      rope_theta=500_000.0, rope_scaling=RopeScaling())
    g = frontend.build_graph(cfg)
    compiler.check_graph(g)
    assert g.op("embed.lookup").shares is None  # owns its table now
    assert g.op("lm_head").kind == "matvec" and not g.op("lm_head").transposed
    assert _kinds(g).count("attention") == 3
    assert set(g.params) == set(flat_params(abstract_model(cfg)))


def test_unknown_primitive_is_an_error(monkeypatch):
    monkeypatch.setattr(frontend, "VECTOR", frontend.VECTOR - {"rsqrt"})
    with pytest.raises(compiler.CompilerError, match="rsqrt"):
        frontend.build_graph(ModelConfig.preset("tiny"))


def test_print_ir(capsys):
    assert spark_main(["compile", "--preset", "tiny", "--target", GRID, "--context", "2048",
                       "--print-ir"]) == 0
    out = capsys.readouterr().out
    for name in flat_params(abstract_model(ModelConfig.preset("tiny"))):
        assert name in out


# ---- partitioning ----------------------------------------------------------------------

def test_every_weight_element_lands_in_exactly_one_tile(tiny_plan):
    g = tiny_plan.graph
    for name, info in g.params.items():
        op = g.op(g.owner()[name])
        if not op.is_tiled:
            continue
        ids = np.arange(1, info.size + 1, dtype=np.int64).reshape(info.shape)
        w_kn = ids.reshape(op.n, op.k).T if op.transposed else ids.reshape(op.k, op.n)
        tiles = tile_weight(w_kn, tiny_plan.regions[op.name].tiling)  # 0 marks an empty slot
        held = tiles[tiles > 0]
        assert held.size == info.size, name  # nothing lost, nothing held twice
        np.testing.assert_array_equal(np.sort(held), ids.ravel())


def test_cores_respect_budget_and_regions_do_not_overlap(tiny_plan):
    t = tiny_plan.target
    owner = np.zeros((tiny_plan.wafers, t.rows, t.cols), int)
    for r in tiny_plan.regions.values():
        assert 0 <= r.row and r.row + r.rows <= t.rows and 0 <= r.col and r.col + r.cols <= t.cols
        if r.group is None:  # rectangles of their own never overlap
            owner[r.wafer, r.row:r.row + r.rows, r.col:r.col + r.cols] += 1
        else:  # ops sharing cores are on their anchor's wafer
            assert r.wafer == tiny_plan.regions[r.group].wafer
    assert owner.max() == 1
    used = compiler.core_bytes(tiny_plan)
    assert used.max() <= t.core_budget
    assert (used > 0).sum() == summary(tiny_plan)["cores_used"]


def test_kv_cache_spread_and_largest_context(tiny_plan):
    ctx = tiny_plan.context
    for o in tiny_plan.graph.ops:
        if o.kind == "attention":
            t = tiny_plan.regions[o.name].tiling
            cols = t.pc // o.heads[1]  # columns per kv head
            assert t.positions * t.pr >= ctx > (t.positions - 1) * t.pr  # rows: positions
            assert t.dh * cols >= o.heads[2] > (t.dh - 1) * cols  # columns: dimensions
            assert t.bytes_per_core <= tiny_plan.target.core_budget
    best = tiny_plan.max_context
    assert best >= ctx
    g, tgt, band, share = tiny_plan.graph, tiny_plan.target, tiny_plan.band, tiny_plan.share

    def wafers(context):
        p = pack_overlay(g, tgt, context) if share == 0 else pack(g, tgt, band, context, share)
        return len(p.wafer_layers)

    assert wafers(best) == tiny_plan.wafers
    assert wafers(best + 1) > tiny_plan.wafers  # one position more does not fit


def test_core_and_op_queries(tiny_plan):
    q = compiler.op_placement(tiny_plan, "blocks.0.attn.q")
    r = q.region
    core = compiler.core(tiny_plan, r.row, r.col, r.wafer)
    assert core.op == "blocks.0.attn.q"
    tile = core.tiles[0]
    assert tile.index == (0, 0) and tile.k_range[0] == 0 and tile.bytes <= core.bytes
    assert compiler.op_placement(tiny_plan, "blocks.0.attn.rotary").host in tiny_plan.regions
    with pytest.raises(IndexError):
        compiler.core(tiny_plan, 10_000, 0)
    with pytest.raises(KeyError):
        compiler.op_placement(tiny_plan, "no.such.op")


# ---- placement -------------------------------------------------------------------------

def test_placement_is_deterministic_and_refinement_lowers_the_cost():
    a = compiler.compile("tiny", GRID, context=2048, seed=3, layers_per_region=1)
    b = compiler.compile("tiny", GRID, context=2048, seed=3, layers_per_region=1)
    assert {k: (r.row, r.col) for k, r in a.regions.items()} == \
        {k: (r.row, r.col) for k, r in b.regions.items()}
    before, after = a.placement_cost
    assert after < before
    from compiler.place import flow_cost, flows

    assert flow_cost(a.regions, flows(a.graph, a.host, a.regions)) == pytest.approx(after)


@pytest.mark.parametrize("band", [64, 16, 7])
def test_consecutive_ops_are_adjacent_before_refinement(band):
    from compiler.place import placed_ops

    g = frontend.build_graph(ModelConfig.preset("tiny"))
    packing = pack(g, compiler.get_target(GRID), band, 2048)
    assert len(packing.wafer_layers) == 1
    ops = [o.name for o in placed_ops(g)]
    for a, b in zip(ops, ops[1:]):
        ra, rb = packing.regions[a], packing.regions[b]
        if ra.row == rb.row:  # same band: side by side
            assert ra.col + ra.cols == rb.col or rb.col + rb.cols == ra.col
        else:  # next band, continuing at the same edge (serpentine)
            assert rb.row == ra.row + band


def test_llama3_8b_fits_one_wse3_at_128k_from_shapes():
    plan = compiler.compile("llama3-8b", "wse3")
    s = summary(plan)
    assert s["wafers"] == 1 and s["params"] == 8_030_261_248
    assert s["max_context"] >= 131_072
    assert s["sram_max_fraction"] <= 1 - plan.target.reserve_fraction


@pytest.mark.slow
def test_too_large_model_is_split_or_refused():
    with pytest.raises(compiler.NoFit, match=r"bytes.*wafer"):
        compiler.compile("llama3-70b", "wse3")
    plan = compiler.compile("llama3-70b", "wse3", wafers=8, refine_moves=5)
    assert 1 < plan.wafers <= 8
    layers = [layer for w in plan.wafer_layers for layer in w]
    assert layers == list(range(80))  # contiguous stages, every layer once


def test_bad_compile_requests():
    with pytest.raises(compiler.CompilerError, match="context"):
        compiler.compile("tiny", GRID, context=0)
    with pytest.raises(compiler.CompilerError, match="exceeds"):
        compiler.compile("tiny", GRID, context=10**7)
    with pytest.raises(compiler.CompilerError, match="preset"):
        compiler.compile("no-such-model", GRID)


# ---- functional execution --------------------------------------------------------------

def test_placed_program_computes_the_models_logits(tiny, tiny_plan):
    ids = tiny.tokenizer.encode(DEFAULT_PROMPT)
    diffs = logit_diffs(tiny_plan, tiny, ids)
    assert len(diffs) == len(ids) >= 10
    assert max(diffs) < 1e-4


def test_greedy_through_the_plan_equals_generate(tiny, tiny_plan):
    ids = tiny.tokenizer.encode("class Stack:\n    def __init__(self):\n")
    ours = compiler.generate_greedy(tiny_plan, tiny, ids, 32)
    ref = tiny.generate_tokens([ids], 32, ignore_eos=True)[0]
    assert ours == list(ref)


def test_a_plan_runs_one_token_of_one_sequence(tiny, tiny_plan):
    from compiler.execute import execute
    from spark_model.kv_cache import init_cache

    cache = init_cache(tiny_plan.cfg, 2, 64)
    with pytest.raises(ValueError, match="one sequence of 1 to 8 tokens"):
        execute(tiny_plan, tiny, [[1], [2]], [[0], [1]], cache)
    with pytest.raises(ValueError, match="at least one token"):
        compiler.generate_greedy(tiny_plan, tiny, [], 4)


def test_untied_model_on_another_grid():
    cfg = ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=6, n_kv_heads=3,
                      head_dim=8, d_ff=80, tie_embeddings=False,
                      rope_theta=500_000.0, rope_scaling=RopeScaling())
    model = init_model(cfg, seed=1)
    plan = compiler.compile(cfg, "grid:12x10:8KB", context=512)
    assert plan.regions["lm_head"].tiling.pr > 1  # K really is split and reduced
    diffs = logit_diffs(plan, model, [5, 17, 42, 7, 299, 0, 3], capacity=256)
    assert max(diffs) < 1e-4


def test_cli_json_and_verify(capsys):
    assert spark_main(["compile", "--checkpoint", str(CKPT), "--target", GRID,
                       "--context", "4096", "--verify", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("params", "weight_bytes", "tiles", "cores_used", "wafers",
                "sram_mean_fraction", "sram_max_fraction", "max_context", "compile_s",
                "max_abs_logit_diff"):
        assert key in s
    cfg = load_config(CKPT)  # the parameter count from the shapes, independently
    d, f = cfg.d_model, cfg.d_ff
    per_layer = (d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim
                 + cfg.n_heads * cfg.head_dim * d + 3 * d * f + 2 * d)
    want = cfg.vocab_size * d + cfg.n_layers * per_layer + d  # tied head, final norm
    assert s["max_abs_logit_diff"] < 1e-4 and s["params"] == want


def test_cli_errors(capsys):
    assert spark_main(["compile", "--preset", "tiny", "--verify"]) == 2
    assert spark_main(["compile", "--preset", "tiny", "--target", "grid:0x1"]) == 1
    assert spark_main(["compile", "--preset", "llama3-70b", "--target", "wse3"]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "no cores" in err and "--wafers" in err
