"""Our model against Hugging Face transformers' Llama on the same weights (optional extra)."""

import numpy as np
import pytest

from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.transformer import full_logits

hf_peer = pytest.importorskip("eval.hf_peer")
if hf_peer.available():
    pytest.skip(hf_peer.available(), allow_module_level=True)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tie):
    cfg = ModelConfig(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=96, tie_embeddings=tie,
                      rope_theta=500_000.0, rope_scaling=RopeScaling())
    base = init_model(cfg, seed=7)
    model = model_from_flat(cfg, {k: np.asarray(v) * (3.0 if v.ndim > 1 else 1.0)
                                  for k, v in flat_params(base).items()})
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(full_logits(model, tokens))
    theirs = hf_peer.logits(hf_peer.to_hf(model), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
