"""eval/quant_quality.py: bits per byte of the shipped model at each weight format, small."""

from pathlib import Path

import pytest

from eval import quant_quality

TINY = Path(__file__).resolve().parent.parent / "checkpoints" / "spark-tiny"


@pytest.mark.skipif(not TINY.is_dir(), reason="no shipped checkpoint")
def test_quality_table_orders_the_formats_by_their_precision():
    rows = quant_quality.run([str(TINY)], ("f32", "q8_0", "q4_0"), n_files=1, seq_len=128,
                             log=lambda *_: None)
    by = {r["weights"]: r for r in rows}
    assert [by[f]["held"] for f in ("f32", "q8_0", "q4_0")] == ["f32", "q8_0", "q4_0"]
    assert by["q8_0"]["param_mib"] < by["f32"]["param_mib"] / 3
    assert len({r["bytes"] for r in rows}) == 1  # the same text for every format
    f32 = by["f32"]["bits_per_byte"]
    assert 0.3 < f32 < 4
    # q8_0 rounds each weight to 1/254 of its block's largest, q4_0 to 1/16: the cost of
    # the first is a fraction of the second's.
    assert abs(by["q8_0"]["bits_per_byte"] - f32) < 0.01
    assert abs(by["q8_0"]["bits_per_byte"] - f32) < abs(by["q4_0"]["bits_per_byte"] - f32)
    text = quant_quality.table(rows)
    assert f"| {TINY} | {f32:.4f} | " in text
    assert f"({by['q4_0']['bits_per_byte'] - f32:+.4f})" in text
