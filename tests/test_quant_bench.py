"""`spark bench decode` with packed weights and the llama.cpp peer, run with tiny sizes (the
real benchmark takes minutes and a quiet machine): every figure the JSON promises is there,
computed from this model, and the peer ran on the same weights."""

import numpy as np
import pytest

import spark_model
from spark_model import checkpoint, packing, quant
from test_bpe import gguf_meta, trained  # noqa: F401
from test_formats_gguf import config, random_params

pytestmark = pytest.mark.filterwarnings("ignore:.*U\\+2581")


@pytest.fixture(scope="module")
def q8_model(small_tokenizer):
    cfg = config(vocab_size=small_tokenizer.vocab_size, d_model=64, d_ff=96, n_layers=2,
                 head_dim=16, max_seq_len=1024)
    base = checkpoint.model_from_flat(cfg, random_params(cfg, seed=6))
    return spark_model.SparkModel(packing.convert_model(base, "q8_0"), small_tokenizer,
                                  capacity=256)


def test_bench_decode_with_llama_cpp_peer_tiny(q8_model):
    pytest.importorskip("llama_cpp")
    from eval import bench_decode

    lines = []
    out = bench_decode.run(q8_model, runs=1, new_tokens=8, ttft_tokens=40, agree_positions=32,
                           positions=(), batches=(), log=lines.append)
    assert out["weights"] == "q8_0" and out["param_bytes"] == q8_model.param_bytes
    assert out["roofline_tokens_per_s"] == pytest.approx(
        out["gemv_gb_per_s"] * 1e9 / q8_model.param_bytes)
    assert out["peer"]["name"].startswith("llama.cpp") and out["peer"]["version"]
    assert out["peer_gguf"] == "exported from Spark's weights"
    for key in ("tokens_per_s", "peer_tokens_per_s", "ttft_1000_s", "peer_ttft_1000_s",
                "rss_mb", "peer_rss_mb"):
        assert out[key] > 0, key
    assert out["ratio_vs_peer"] == pytest.approx(out["tokens_per_s"] / out["peer_tokens_per_s"])
    assert out["agreement_positions"] == 32 and out["top1_agreement"] > 0.8
    diff = out["greedy_first_difference"]
    assert diff is None or (0 <= diff < 8 and "greedy_texts_at_difference" in out)
    assert out["hf_skipped"] == "transformers runs float weights only"
    assert any("llama.cpp" in line for line in lines)


def test_bench_loads_a_gguf_as_stored_or_goes_through_f32_to_widen(tmp_path,
                                                                  trained):  # noqa: F811
    """A Q4_1 file asked for q4_1 runs as stored (the peer gets the file itself); asked for
    q8_0 it is widened through f32, which the result notes."""
    from eval import bench_decode
    from spark_model.formats.gguf_write import write_gguf as spark_write_gguf

    cfg = config(d_model=64, d_ff=96, n_layers=1, head_dim=16,
                 vocab_size=trained.get_vocab_size())
    params = packing.convert(random_params(cfg, seed=7), checkpoint.param_shapes(cfg), "q4_1")
    path = spark_write_gguf(tmp_path / "q41.gguf", cfg, params, gguf_meta(trained))
    same, gguf, note = bench_decode.load_for_bench(str(path), "q4_1", log=lambda *_: None)
    assert gguf == path and note is None and same.weights == "q4_1"
    wide, gguf, note = bench_decode.load_for_bench(str(path), "q8_0", log=lambda *_: None)
    assert gguf is None and wide.weights == "q8_0" and "narrower source" in note
    dense = packing.convert(checkpoint.flat_params(same.model), checkpoint.param_shapes(cfg),
                            "f32")
    np.testing.assert_array_equal(  # the GGUF blocks, whatever layout the model holds
        quant.to_gguf_blocks(packing.pack("blocks.0.mlp.up", dense["blocks.0.mlp.up"], "q8_0")),
        quant.to_gguf_blocks(checkpoint.flat_params(wide.model)["blocks.0.mlp.up"]))
