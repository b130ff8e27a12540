"""The context-length curve: same target at every point, agreeing with the full forward."""

from __future__ import annotations

import inspect
import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import context_curve as cc
from spark_model import SparkModel
from spark_model.transformer import full_logits

TEXT = inspect.getsource(textwrap)


class LogitsOnly:
    def __init__(self, m):
        self.tokenizer, self.config, self.logits = m.tokenizer, m.config, m.logits


@pytest.fixture(scope="module")
def model(small_model, small_tokenizer):
    return SparkModel(small_model, small_tokenizer, capacity=64)


def test_split_keeps_every_byte_and_cuts_at_a_line():
    context, target = cc.split_target(TEXT, 1000)
    assert context + target == TEXT
    assert context.endswith("\n") and 900 <= len(target.encode()) <= 1000
    with pytest.raises(cc.ContextCurveError, match="no context"):
        cc.split_target("x = 1\n", 100)


def test_a_point_equals_the_full_forward(model):
    context, target = cc.split_target(TEXT, 300)
    ctx_ids, tgt_ids = model.tokenizer.encode(context), model.tokenizer.encode(target)
    nbytes = len(target.encode())
    for n in (16, 200):
        fast, kept = cc.score_point(model, ctx_ids, tgt_ids, nbytes, n)
        plain, _ = cc.score_point(LogitsOnly(model), ctx_ids, tgt_ids, nbytes, n)
        seq = jnp.asarray([model.tokenizer.encode("", bos=True) + ctx_ids[-n:] + tgt_ids],
                          jnp.int32)
        logits = full_logits(model.model, seq[:, :-1])
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, seq[:, 1:, None], -1)[..., 0]
        reference = float(jnp.sum(nll[0, -len(tgt_ids):])) / (nbytes * math.log(2))
        assert kept == n
        assert fast == pytest.approx(reference, abs=1e-4)
        assert plain == pytest.approx(reference, abs=1e-4)


def test_the_curve_scores_one_target_and_resumes(tmp_path, model):
    sources = {"a": TEXT, "short": TEXT[:3000]}
    got = cc.run(model, sources, tmp_path, model_id="m", lengths=(64, 256, 100000),
                 target_bytes=400, progress=False)
    assert got["lengths"] == [64, 256, 100000]
    assert got["context_tokens"]["a"]["64"] == 64 and got["context_tokens"]["a"]["256"] == 256
    # 100000 is capped by max_seq_len? No: the small model's max_seq_len is 128K, and the
    # source is far shorter, so that point is left out rather than silently shortened.
    assert got["sources"]["a"]["100000"] is None and got["mean"]["100000"] is None
    assert got["sources"]["short"]["256"] is None or got["context_tokens"]["short"]["256"] == 256
    records = [json.loads(x) for x in (tmp_path / cc.RESULTS_FILE).read_text().splitlines()]
    assert {r["target_bytes"] for r in records if r["source"] == "a"} == {
        got["targets"]["a"]["target_bytes"]}
    again = cc.run(model, sources, tmp_path, model_id="m", lengths=(64, 256, 100000),
                   target_bytes=400, progress=False)
    assert again["sources"] == got["sources"]
    assert len((tmp_path / cc.RESULTS_FILE).read_text().splitlines()) == len(records)
    cc.plot(got, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_sequence_text_orders_files_and_names_them(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("b = 2", encoding="utf-8")
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n", encoding="utf-8")
    (tmp_path / "pkg" / "bad.py").write_bytes(b"\xff")
    text = cc.sequence_text(list((tmp_path / "pkg").iterdir()), tmp_path)
    assert text == "# file: pkg/a.py\na = 1\n# file: pkg/b.py\nb = 2\n"
