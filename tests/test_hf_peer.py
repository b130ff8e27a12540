"""Our model against Hugging Face transformers' Llama on the same weights (optional extra)."""

import numpy as np
import pytest

from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.transformer import full_logits

hf_peer = pytest.importorskip("eval.hf_peer")
if hf_peer.available():
    pytest.skip(hf_peer.available(), allow_module_level=True)


@pytest.mark.parametrize("tie, bias, scaling", [
    (True, False, RopeScaling()), (False, False, RopeScaling()),
    (True, True, None), (False, True, RopeScaling(factor=4.0, kind="linear"))])
def test_logits_match_transformers(tie, bias, scaling):
    cfg = ModelConfig(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=96, tie_embeddings=tie, attn_bias=bias,
                      rope_theta=500_000.0, rope_scaling=scaling)
    base = init_model(cfg, seed=7)
    rng = np.random.default_rng(1)  # Biases start at zero: give them values of their own.
    model = model_from_flat(cfg, {k: (rng.normal(0, 0.5, v.shape).astype(np.float32)
                                      if k.endswith("_bias")
                                      else np.asarray(v) * (3.0 if v.ndim > 1 else 1.0))
                                  for k, v in flat_params(base).items()})
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(full_logits(model, tokens))
    hf = hf_peer.to_hf(model)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    theirs = hf_peer.logits(hf, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
