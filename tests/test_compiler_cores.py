"""Bytes per core: the byte terms of a tiling add up to its core_bytes, and a plan's
core_bytes (one matrix product per rectangle) agrees with the per-core view `core`."""

import numpy as np
import pytest

import compiler
from compiler.partition import Tiling
from compiler.place import share_candidates
from spark_model import ModelConfig

GRID = "grid:64x64:48KB"
SHARES = share_candidates(ModelConfig.preset("tiny").n_layers) + [0]

MATVECS = [Tiling(pr=pr, pc=pc, k=k, n=n, wbytes=w, share=s, rk=rk, rn=rn)
           for pr, pc, k, n, w, s, rk, rn in [
               (4, 4, 64, 32, 2, 1, 0, 0),  # even split
               (7, 5, 100, 23, 4, 1, 0, 0),  # uneven both ways
               (7, 5, 100, 23, 2, 3, 2, 4),  # shared region, larger parts rotated
               (9, 3, 5, 2, 2, 2, 1, 1),  # more rows and columns than K and N
               (1, 1, 3, 3, 4, 5, 0, 0),
               (13, 11, 1000, 777, 1, 4, 12, 10)]]
ATTENTION = [Tiling(pr=8, pc=6, positions=3, dh=3, hd=8, kv_bytes=4, buffers=100, share=s,
                    rn=rn) for s, rn in [(1, 0), (3, 1), (2, 2)]]


@pytest.mark.parametrize("tiling", MATVECS + ATTENTION)
def test_byte_terms_add_up_to_core_bytes(tiling):
    got = sum(np.outer(a, b) for a, b in tiling.byte_terms())
    np.testing.assert_array_equal(got, tiling.core_bytes())


@pytest.mark.parametrize("share", SHARES)
def test_plan_core_bytes_agree_with_each_core(share):
    plan = compiler.compile("tiny", GRID, context=2048, layers_per_region=share)
    used = compiler.core_bytes(plan)
    t = plan.target
    assert used.shape == (plan.wafers, t.rows, t.cols)
    direct = np.zeros_like(used)  # each region's core_bytes added where it lies
    for r in plan.regions.values():
        direct[r.wafer, r.row:r.row + r.rows, r.col:r.col + r.cols] += r.tiling.core_bytes()
    hosted = used - direct  # norm scales and the like, spread over their host's cores
    assert hosted.min() >= 0 and hosted.sum() > 0
    for w in range(plan.wafers):
        for row in range(0, t.rows, 5):
            for col in range(0, t.cols, 5):
                assert used[w, row, col] == compiler.core(plan, row, col, w).bytes
