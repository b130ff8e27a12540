"""SmolLM2-135M's Q4_1 GGUF file loaded packed: the file's own blocks, the forward of the
dequantized model, and greedy decoding through the packed kernels (slow; skipped without
the file)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spark_model
from spark_model import kernels, packing, quant
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.transformer import full_logits
from test_formats_gguf import SMOLLM2

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"no SmolLM2 GGUF at {SMOLLM2}")]


def test_smollm2_loads_packed_and_decodes_like_its_dequantized_forward(monkeypatch):
    from gguf import GGUFReader

    m = spark_model.load(SMOLLM2, capacity=512)
    assert m.weights == "mixed (q4_1, q8_0)" and "converted" not in m.source_info
    assert m.param_bytes < 100e6  # not the 538 MB of float32
    flat = flat_params(m.model)
    # The file's own bytes: ffn_up is not reordered, so its blocks are the file's rows.
    raw = {t.name: t for t in GGUFReader(str(SMOLLM2)).tensors}["blk.3.ffn_up.weight"]
    np.testing.assert_array_equal(quant.to_gguf_blocks(flat["blocks.3.mlp.up"]),
                                  np.asarray(raw.data).reshape(1536, -1))
    assert flat["embed"].fmt == "q8_0"
    # Greedy tokens from the engine (native packed products) against the full forward of
    # the same weights dequantized, at every position where its top two logits are apart
    # by more than the kernels' activation rounding can move them.
    dense = model_from_flat(m.config, {n: np.asarray(v) for n, v in flat_params(
        packing.convert_model(m.model, "f32")).items()})
    prompt = m.tokenizer.encode("def fibonacci(n):\n    ")
    new = m.generate_tokens([prompt], 40, ignore_eos=True)[0]
    seq = np.asarray(prompt + new)
    logits = np.asarray(full_logits(dense, seq[None]))[0]
    at = np.arange(len(prompt) - 1, len(seq) - 1)
    top2 = np.sort(logits[at], -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(np.asarray(new)[clear], logits[at].argmax(-1)[clear])
    # The packed model's own full forward is the dequantized one's. Up to QMATVEC_ROWS
    # tokens its products run as a decode step's do (activations rounded to 8 bits per
    # block): within 5% of the largest logit (3.6% measured), the same top token where the
    # reference's is clear.
    ours = np.asarray(m.logits(seq[None]))[0]
    np.testing.assert_allclose(ours, logits, atol=0.05 * np.abs(logits).max(), rtol=0)
    np.testing.assert_array_equal(ours[at].argmax(-1)[clear], logits[at].argmax(-1)[clear])
    # With more rows: to float rounding through the float32 expansion; on AMX tiles
    # (activations rounded to bfloat16) within 1% of the largest logit (0.8% measured).
    monkeypatch.setattr(kernels, "QMATVEC_ROWS", kernels.MAX_ROWS)  # read when traced
    ours = np.asarray(nnx.jit(lambda mm, t: mm(t))(m.model, jnp.asarray(seq[None])))[0]
    tol = 1e-2 if kernels.amx_usable() else 2e-3
    np.testing.assert_allclose(ours, logits, atol=tol * np.abs(logits).max(), rtol=0)
