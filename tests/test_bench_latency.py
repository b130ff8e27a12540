"""`spark bench latency`'s sections against a server thread at small settings: the prefix
reuse section reports the blocks the server really reused (checked against the prompts'
own tokenization), and the infill section measures a model with FIM tokens and reports one
without them as not applicable."""

from __future__ import annotations

import pytest

from eval import bench_latency
from spark_model.api import SparkModel
from spark_model.serve.prefix_cache import BLOCK
from spark_model.serve.server import ServerThread
from spark_model.tokenizer import stdlib_python_files

from fim_models import random_model, with_fim_pieces


@pytest.fixture(scope="module")
def code() -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_python_files()[:40]]


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(bench_latency, "PREFIX_TOKENS", 100)
    monkeypatch.setattr(bench_latency, "SUFFIX_TOKENS", 8)
    monkeypatch.setattr(bench_latency, "FILL_TOKENS", 6)


@pytest.mark.slow
def test_sections_measure_a_fim_model_and_skip_infill_without_fim(small, small_tokenizer,
                                                                  small_model, code):
    tok, _ = with_fim_pieces(small_tokenizer)
    model = SparkModel(random_model(tok.vocab_size, seed=2, max_seq_len=2048), tok,
                       capacity=2048)
    with ServerThread(model, max_batch=2, warmup=False, prefix_cache_mb=1) as srv:
        run = bench_latency.Run("fim", tok, srv.port, 2, code)
        reuse = bench_latency.prefix_reuse(run)
        windows = bench_latency._windows(run, 3)[1:]  # the timed ones (the first warms up)
        for (prefix, (tail_a, tail_b)), cached, prompt in zip(
                windows, reuse["cached_tokens_warm"], reuse["prompt_tokens"]):
            a, b = tok.encode(prefix + tail_a, bos=True), tok.encode(prefix + tail_b, bos=True)
            same = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            assert cached == BLOCK * min(same // BLOCK, (len(b) - 1) // BLOCK) > 0
            assert prompt == len(b)
        assert reuse["cached_tokens_cold"] == [0, 0]
        assert len(reuse["cold_ttft_ms"]) == len(reuse["warm_ttft_ms"]) == 2
        fill = bench_latency.infill(run)
        assert fill["applicable"] and fill["requests"] == 2
        assert all(0 < t <= total for t, total in zip(fill["ttft_ms"], fill["total_ms"]))
        assert all(1 <= n <= 6 for n in fill["tokens_predicted"])
    with ServerThread(SparkModel(small_model, small_tokenizer, capacity=2048), max_batch=1,
                      warmup=False) as srv:
        fill = bench_latency.infill(bench_latency.Run("plain", small_tokenizer, srv.port, 1,
                                                      code))
        assert fill == {"applicable": False, "status": 400, "reason": fill["reason"]}
        assert "fill-in-the-middle" in fill["reason"]


def test_the_section_registry_names_every_section():
    assert list(bench_latency.SECTIONS) == ["edit_workload", "fresh_code", "prefix_reuse",
                                            "infill"]
    assert all(fn is not None for _, fn in bench_latency.SECTIONS.values())
    with pytest.raises(ValueError, match="unknown section"):
        bench_latency.main(models=[], sections=["nope"])
