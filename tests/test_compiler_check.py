"""check_plan: every mapping the planner produces passes it, and each kind of broken plan
fails it with a message that names what is wrong."""

import dataclasses

import numpy as np
import pytest

import compiler
from compiler.check import check_plan
from compiler.partition import tile_weight
from compiler.place import handoff_pairs, share_candidates
from spark_model import ModelConfig

GRID = "grid:64x64:48KB"
CONTEXT = 2048
# Every mapping kind: each layers-per-region value the planner tries, and 0 (every op
# overlaid on the whole wafer).
SHARES = share_candidates(ModelConfig.preset("tiny").n_layers) + [0]


@pytest.fixture(scope="module")
def plans():
    return {s: compiler.compile("tiny", GRID, context=CONTEXT, layers_per_region=s)
            for s in SHARES}


def _tiles_hold_every_element_once(plan):
    """Independently of check_plan: cut each weight (its elements numbered 1..size) into
    the plan's tiles and count what the tiles hold."""
    g = plan.graph
    for name, info in g.params.items():
        op = g.op(g.owner()[name])
        if not op.is_tiled:
            continue
        ids = np.arange(1, info.size + 1, dtype=np.int64).reshape(info.shape)
        w_kn = ids.reshape(op.n, op.k).T if op.transposed else ids.reshape(op.k, op.n)
        tiles = tile_weight(w_kn, plan.regions[op.name].tiling)  # 0 marks an empty slot
        held = np.sort(tiles[tiles > 0])
        assert held.size == info.size and (held == ids.ravel()).all(), name


@pytest.mark.parametrize("share", SHARES)
def test_every_mapping_kind_passes_check_plan(plans, share):
    plan = plans[share]
    assert plan.share == share  # the forced mapping was the one compiled
    check_plan(plan)
    _tiles_hold_every_element_once(plan)
    used = compiler.core_bytes(plan)
    assert 0 < used.max() <= plan.target.core_budget
    if share == 0:  # the overlay: every op over the whole wafer from its top-left core
        assert all((r.row, r.col) == (0, 0) for r in plan.regions.values())
    else:
        assert {r.share for r in (plan.regions[o.name].tiling for o in plan.graph.ops
                                  if o.layer is not None and o.name in plan.regions)} == {share}


# ---- broken plans ---------------------------------------------------------------------

def _with_region(plan, name, **changes):
    regions = dict(plan.regions)
    regions[name] = dataclasses.replace(regions[name], **changes)
    return dataclasses.replace(plan, regions=regions)


def _with_handoffs(plan, keep):
    routing = dataclasses.replace(plan.routing, handoffs=[h for h in plan.routing.handoffs
                                                          if keep(h)])
    return dataclasses.replace(plan, routing=routing)


def _with_path(plan, index, path):
    handoffs = [dict(h) for h in plan.routing.handoffs]
    handoffs[index]["path"] = path
    return dataclasses.replace(plan, routing=dataclasses.replace(plan.routing,
                                                                 handoffs=handoffs))


def test_a_region_off_the_grid_fails(plans):
    plan = plans[1]
    r = plan.regions["blocks.0.attn.q"]
    t = plan.target
    with pytest.raises(compiler.CompilerError, match=r"region blocks\.0\.attn\.q .*outside"):
        check_plan(_with_region(plan, r.op, col=t.cols - r.cols + 1))
    with pytest.raises(compiler.CompilerError, match=r"region blocks\.0\.attn\.q .*outside"):
        check_plan(_with_region(plan, r.op, row=-1))
    with pytest.raises(compiler.CompilerError, match=r"blocks\.0\.attn\.q is on wafer 1"):
        check_plan(_with_region(plan, r.op, wafer=1))


def test_overlapping_regions_fail(plans):
    plan = plans[1]
    a, b = plan.regions["blocks.0.attn.q"], plan.regions["blocks.0.attn.k"]
    with pytest.raises(compiler.CompilerError,
                       match=r"regions blocks\.0\.attn\.k, blocks\.0\.attn\.q overlap on "
                             rf"core \({a.row}, {a.col}\)"):
        check_plan(_with_region(plan, b.op, row=a.row, col=a.col))


def test_a_sharing_region_off_its_anchor_fails(plans):
    plan = plans[2]
    name = next(n for n, r in plan.regions.items() if r.group is not None)
    r = plan.regions[name]
    with pytest.raises(compiler.CompilerError, match=rf"region {name} .*shares the cores of "
                                                     rf"{r.group} .*top-left"):
        check_plan(_with_region(plan, name, col=r.col - 1 if r.col else r.col + 1))


def test_a_weight_held_twice_fails(plans):
    plan = plans[1]
    # The tied embedding's lookup reads the output projection's tiles; a region of its
    # own would hold every element of the table a second time.
    regions = dict(plan.regions)
    regions["embed.lookup"] = dataclasses.replace(regions["embed"], op="embed.lookup",
                                                  group="embed")
    with pytest.raises(compiler.CompilerError, match=r"weight embed is held by 2 regions "
                                                     r"\(.*embed.*embed\.lookup.*\)"):
        check_plan(dataclasses.replace(plan, regions=regions))


def test_a_tiling_that_misses_or_repeats_rows_fails(plans):
    plan = plans[1]
    r = plan.regions["blocks.0.mlp.down"]
    k = r.tiling.k
    short = dataclasses.replace(r.tiling, k=k - 1)
    with pytest.raises(compiler.CompilerError, match=rf"weight blocks\.0\.mlp\.down: row "
                                                     rf"{k - 1} is in 0 parts"):
        check_plan(_with_region(plan, r.op, tiling=short))
    long = dataclasses.replace(r.tiling, k=k + 1)
    with pytest.raises(compiler.CompilerError, match=r"holds rows outside the"):
        check_plan(_with_region(plan, r.op, tiling=long))


def test_too_little_sram_fails(plans):
    plan = plans[1]
    peak = int(compiler.core_bytes(plan).max())
    tight = plan.target.replace(sram_bytes=peak)  # the reserve leaves less than the peak
    with pytest.raises(compiler.CompilerError, match=r"holds [\d,]+ bytes, over the [\d,]+-byte "
                                                     r"budget per core"):
        check_plan(dataclasses.replace(plan, target=tight))
    roomy = plan.target.replace(sram_bytes=int(peak / (1 - plan.target.reserve_fraction)) + 1)
    check_plan(dataclasses.replace(plan, target=roomy))  # just enough passes


def test_a_short_cache_fails(plans):
    plan = plans[1]
    with pytest.raises(compiler.CompilerError, match=r"attention blocks\.0\.attn\.kv_cache "
                                                     r"holds .* fewer than the plan's context"):
        check_plan(dataclasses.replace(plan, context=plan.context * 2))


@pytest.mark.parametrize("share", SHARES)
def test_a_dropped_route_fails(plans, share):
    plan = plans[share]
    with pytest.raises(compiler.CompilerError, match="not routed"):
        check_plan(dataclasses.replace(plan, routing=None))
    if share == 0:  # one wafer: every op on the same cores, so nothing moves between them
        assert plan.wafers == 1
        assert plan.routing.handoffs == [] and not list(handoff_pairs(
            plan.graph, plan.host, plan.regions))
        return
    h = plan.routing.handoffs[len(plan.routing.handoffs) // 2]
    pair = (h["src"], h["dst"])
    with pytest.raises(compiler.CompilerError, match=rf"region {pair[0]} to region "
                                                     rf"{pair[1]}\) is not routed"):
        check_plan(_with_handoffs(plan, lambda x: (x["src"], x["dst"]) != pair))


def test_a_route_that_misses_its_regions_or_leaves_the_grid_fails(plans):
    plan = plans[1]
    t = plan.target
    i, h = next((i, h) for i, h in enumerate(plan.routing.handoffs)  # one that turns
                if h["path"][0][1] != h["path"][-1][1] and h["path"][0][2] != h["path"][-1][2])
    path = h["path"]
    check_plan(_with_path(plan, i, list(path)))  # the path as routed passes
    src, dst = plan.regions[h["src"]], plan.regions[h["dst"]]
    far = next((0, r, c) for r in range(t.rows) for c in range(t.cols)
               if not src.contains(r, c) and not dst.contains(r, c))
    with pytest.raises(compiler.CompilerError, match=rf"route {h['src']} -> {h['dst']} starts "
                                                     rf"at core \({far[1]}, {far[2]}\)"):
        check_plan(_with_path(plan, i, [far] + path[1:]))
    with pytest.raises(compiler.CompilerError, match=r"ends at core"):
        check_plan(_with_path(plan, i, path[:-1] + [far]))
    with pytest.raises(compiler.CompilerError, match=rf"passes core \({t.rows}, 0\)"):
        check_plan(_with_path(plan, i, [path[0], (0, t.rows, 0), path[-1]]))
    with pytest.raises(compiler.CompilerError, match="jumps from"):  # a diagonal step
        check_plan(_with_path(plan, i, [path[0], path[-1]]))
