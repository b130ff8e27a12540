"""Long-sequence scoring (blockwise attention, chunked logits) against the full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.bpb import BpbError, bits_per_byte
from spark_model import SparkModel
from spark_model.modules import causal_attention
from spark_model.flash_attention import flash_attention
from spark_model.scoring import token_nll
from spark_model.transformer import full_logits


@pytest.mark.parametrize("t,block,n,kv", [(1, 4, 2, 2), (7, 4, 4, 2), (64, 16, 4, 1),
                                          (100, 32, 6, 3), (33, 128, 2, 1)])
def test_flash_attention_and_its_gradient_equal_the_masked_softmax(t, block, n, kv):
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.standard_normal((2, t, n, 8)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, kv, 8)) * 2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, t, kv, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, t, n, 8)), jnp.float32)

    def value_and_grads(kernel):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * w),
                                          argnums=(0, 1, 2)))(q, k, v)

    want, want_g = value_and_grads(lambda q, k, v: causal_attention(q, k, v)[0])
    got, got_g = value_and_grads(lambda q, k, v: flash_attention(q, k, v, block))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
    for a, b in zip(got_g, want_g):  # dq, dk, dv through the custom backward
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(flash_attention(q, k, v, block),
                               causal_attention(q, k, v)[0], atol=2e-5, rtol=2e-5)


def _reference_nll(model, tokens, targets):
    logits = full_logits(model, jnp.asarray(tokens))
    picked = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return np.asarray(jax.nn.logsumexp(logits, axis=-1) - picked)


@pytest.mark.parametrize("t,block,chunk", [(50, 16, 16), (97, 32, 40), (128, 512, 2048)])
def test_token_nll_equals_the_full_forward(small_model, t, block, chunk):
    rng = np.random.default_rng(0)
    v = small_model.cfg.vocab_size
    tokens = rng.integers(0, v, (2, t)).astype(np.int32)
    targets = rng.integers(0, v, (2, t)).astype(np.int32)
    got = token_nll(small_model, jnp.asarray(tokens), jnp.asarray(targets), block=block,
                    chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), _reference_nll(small_model, tokens, targets),
                               atol=1e-4)


class LogitsOnly:
    """The same model seen only through its full forward (bpb's plain path)."""

    def __init__(self, m):
        self.tokenizer, self.config, self.logits = m.tokenizer, m.config, m.logits


def test_bpb_through_blockwise_scoring_equals_the_full_forward(tmp_path, small_model,
                                                               small_tokenizer):
    m = SparkModel(small_model, small_tokenizer, capacity=64)
    f = tmp_path / "a.py"
    f.write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 12, encoding="utf-8")
    for seq_len in (16, 100):
        fast = bits_per_byte(m, [f], seq_len=seq_len, batch=2)
        plain = bits_per_byte(LogitsOnly(m), [f], seq_len=seq_len, batch=2)
        assert fast["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], abs=1e-4)
        assert fast["tokens"] == plain["tokens"]


def test_impossible_windows_are_clear_errors(tmp_path, small_model, small_tokenizer):
    m = SparkModel(small_model, small_tokenizer, capacity=64)
    f = tmp_path / "a.py"
    f.write_text("x = 1\n", encoding="utf-8")
    too_long = small_model.cfg.max_seq_len + 1
    with pytest.raises(BpbError, match="longer than the model's"):
        bits_per_byte(m, [f], seq_len=too_long)
    with pytest.raises(ValueError, match="longer than the model's"):
        m.nll(np.zeros((1, too_long), np.int32), np.zeros((1, too_long), np.int32))
    with pytest.raises(ValueError, match="one shape"):
        m.nll(np.zeros((1, 4), np.int32), np.zeros((1, 5), np.int32))
