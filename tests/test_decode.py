"""The decode engine against independent references: the full forward, direct attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spark_model
from spark_model import ModelConfig, RopeScaling, engine, init_model
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.kv_cache import cache_length, cached_attention, init_cache
from spark_model.transformer import full_logits

CFG = ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=48, rope_theta=500_000.0, rope_scaling=RopeScaling())


@nnx.jit
def _cached_logits(model, tokens, positions, cache):
    x, cache = model.cached(tokens, positions, cache)
    return model.logits(x), cache


def _teacher_forced(model, tokens_bt, lengths, prefill_len, capacity=512):
    """Prefill `prefill_len` tokens, then feed one token per step at each row's position."""
    batch, t = tokens_bt.shape
    cache = init_cache(model.cfg, batch, capacity)
    pos = jnp.broadcast_to(jnp.arange(prefill_len), (batch, prefill_len))
    first, cache = _cached_logits(model, tokens_bt[:, :prefill_len], pos, cache)
    steps = [first]
    for i in range(prefill_len, t):
        logits, cache = _cached_logits(model, tokens_bt[:, i:i + 1],
                                       jnp.full((batch, 1), i), cache)
        steps.append(logits)
    return np.asarray(jnp.concatenate(steps, axis=1))


def test_cached_decoding_equals_full_forward_batch1():
    model = init_model(CFG, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 300)))
    full = np.asarray(full_logits(model, tokens))
    cached = _teacher_forced(model, tokens, [300], prefill_len=37)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


def test_cached_decoding_ragged_batch():
    """Rows at different positions in one step: each must match its own full forward."""
    model = init_model(CFG, seed=4)
    rng = np.random.default_rng(1)
    a = rng.integers(0, CFG.vocab_size, 260)
    b = rng.integers(0, CFG.vocab_size, 200)
    cache = init_cache(CFG, 2, 512)
    # Row 0 prefills 60 tokens, row 1 prefills 20 (padding after), then both step together.
    prompt = np.zeros((2, 64), np.int32)
    prompt[0, :60], prompt[1, :20] = a[:60], b[:20]
    _, cache = _cached_logits(model, jnp.asarray(prompt),
                              jnp.broadcast_to(jnp.arange(64), (2, 64)), cache)
    outs = [[], []]
    for i in range(180):
        toks = jnp.asarray([[a[60 + i]], [b[20 + i]]])
        pos = jnp.asarray([[60 + i], [20 + i]])
        logits, cache = _cached_logits(model, toks, pos, cache)
        outs[0].append(np.asarray(logits[0, 0]))
        outs[1].append(np.asarray(logits[1, 0]))
    full_a = np.asarray(full_logits(model, jnp.asarray(a[None, :240])))[0, 60:240]
    full_b = np.asarray(full_logits(model, jnp.asarray(b[None, :200])))[0, 20:200]
    np.testing.assert_allclose(np.stack(outs[0]), full_a, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack(outs[1]), full_b, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("q_pos", [[100_000], [4095, 4096, 99_999]])
def test_long_position_attention_matches_direct_reference(q_pos):
    """A 128K cache filled synthetically up to ~100K: blocked attention == direct softmax."""
    k_heads, g, h = 2, 2, 16
    s = cache_length(131_072)
    rng = np.random.default_rng(2)
    k = rng.normal(size=(1, k_heads, s, h)).astype(np.float32)  # (B, K, S, H)
    v = rng.normal(size=(1, k_heads, s, h)).astype(np.float32)
    t = len(q_pos)
    q = rng.normal(size=(1, t, k_heads * g, h)).astype(np.float32) * 3
    # Garbage beyond the filled part: it would dominate the softmax if it leaked in.
    k[:, :, max(q_pos) + 1:] = 1e3
    v[:, :, max(q_pos) + 1:] = 1e6
    ours = np.asarray(jax.jit(cached_attention)(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([q_pos])))
    for ti, p in enumerate(q_pos):
        for n in range(k_heads * g):
            kv = n // g
            scores = k[0, kv, :p + 1].astype(np.float64) @ q[0, ti, n] / math.sqrt(h)
            w = np.exp(scores - scores.max())
            ref = (w / w.sum()) @ v[0, kv, :p + 1]
            np.testing.assert_allclose(ours[0, ti, n], ref, atol=1e-4, rtol=1e-4)


# ---- the generation API ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(small_tokenizer):
    cfg = CFG.replace(vocab_size=small_tokenizer.vocab_size)
    base = init_model(cfg, seed=5)
    # Sharper weights than the initialiser, so the argmax chain has no near-ties.
    sharp = {k: np.asarray(v) * (4.0 if v.ndim > 1 else 1.0)
             for k, v in flat_params(base).items()}
    return spark_model.SparkModel(model_from_flat(cfg, sharp), small_tokenizer, capacity=1024)


def _argmax_chain(lm, prompt, n, width=128):
    """Greedy decoding by re-running the full forward on the whole text every step.

    Inputs are right-padded to one width (causality makes the padding invisible to the
    positions read), so the reference compiles once.
    """
    ids = lm.tokenizer.encode(prompt, bos=True)
    out = []
    for _ in range(n):
        seq = ids + out
        padded = seq + [lm.tokenizer.pad_id] * (width - len(seq))
        nxt = int(np.argmax(np.asarray(lm.logits([padded]))[0, len(seq) - 1]))
        out.append(nxt)
        if nxt == lm.tokenizer.eos_id:
            break
    return lm.tokenizer.decode(out, errors="replace")


@pytest.mark.parametrize("prompt", ["def fibonacci(n):\n", "", "import os\nclass A:\n    x = 'é'"])
def test_greedy_generate_equals_full_forward_argmax(lm, prompt):
    assert lm.generate(prompt, max_new_tokens=40) == _argmax_chain(lm, prompt, 40)


def test_batched_generate_equals_single(lm):
    prompts = ["def f(x):", "x", "for i in range(10):\n    print(i)\n" * 3]
    assert lm.generate(prompts, max_new_tokens=30) == [
        lm.generate(p, max_new_tokens=30) for p in prompts]


def test_seeds(lm):
    kw = dict(max_new_tokens=40, temperature=1.0)
    a = lm.generate("def g():", seed=1, **kw)
    assert a == lm.generate("def g():", seed=1, **kw)
    assert a != lm.generate("def g():", seed=2, **kw)
    # Rows of one batch draw from different streams even for the same prompt.
    r = lm.generate(["def g():"] * 3, seed=1, **kw)
    assert r[0] == a and len(set(r)) == 3


def test_top_k_1_and_tiny_top_p_are_greedy(lm):
    greedy = lm.generate("while True:", max_new_tokens=30)
    assert lm.generate("while True:", max_new_tokens=30, temperature=1.5, top_k=1) == greedy
    assert lm.generate("while True:", max_new_tokens=30, temperature=1.5, top_p=1e-6) == greedy


def test_stop_strings_cut_and_end_early(lm):
    full = lm.generate("def h(a, b):", max_new_tokens=60)
    probe = full[len(full) // 2: len(full) // 2 + 3]
    assert probe and probe in full
    out = lm.generate("def h(a, b):", max_new_tokens=60, stop=[probe, "\x00never"])
    assert out == full[:full.index(probe)]
    assert lm.last_stats["new_tokens"] < 60


def test_stream_equals_generate(lm):
    for kw in (dict(), dict(stop=["e"]), dict(temperature=0.8, seed=3)):
        pieces = list(lm.stream("def k(n):", max_new_tokens=50, **kw))
        assert "".join(pieces) == lm.generate("def k(n):", max_new_tokens=50, **kw)
    assert len(list(lm.stream("def k(n):", max_new_tokens=50))) > 1


def test_new_prompt_lengths_do_not_recompile(lm):
    lm.generate("a", max_new_tokens=20)
    before = engine.generate_jit._cache_size()
    prompts = ["ab", "x = 1", "import re", "def f(x):"]
    assert all(len(lm.tokenizer.encode(p, bos=True)) <= 16 for p in prompts)  # one bucket
    for i, prompt in enumerate(prompts):
        # New lengths, sampling settings, seeds, stop lists and budgets: all traced.
        lm.generate(prompt, max_new_tokens=17 + i, temperature=0.5 * i, top_p=0.9,
                    seed=7 + i, stop=["\n\n"] * i)
    assert engine.generate_jit._cache_size() == before
    # Two longer prompts in one larger bucket: at most one more program between them.
    long_a, long_b = "0123456789" * 9, "0123456789" * 11  # digits are split: ~90, ~110 ids
    assert 64 < len(lm.tokenizer.encode(long_a, bos=True)) < len(
        lm.tokenizer.encode(long_b, bos=True)) <= 128
    lm.generate(long_a, max_new_tokens=20)
    lm.generate(long_b, max_new_tokens=20)
    assert engine.generate_jit._cache_size() <= before + 1


def test_a_second_model_of_the_same_structure_reuses_the_programs(lm):
    """The static graph is hashed once, and equal structures hit the same compiled programs."""
    other = spark_model.SparkModel(lm.model, lm.tokenizer, capacity=lm.capacity)
    assert other.graphdef is not lm.graphdef
    assert other.graphdef == lm.graphdef and hash(other.graphdef) == hash(lm.graphdef)
    assert lm.graphdef != lm.graphdef.graphdef  # only another StaticGraph is equal
    lm.generate("def g(x):", max_new_tokens=9)
    before = engine.generate_jit._cache_size()
    assert other.generate("def g(x):", max_new_tokens=9) == lm.generate("def g(x):",
                                                                        max_new_tokens=9)
    assert engine.generate_jit._cache_size() == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2000), "capacity"),
    (dict(seed=-3), "seed"),
    (dict(stop=[""]), "stop"),
])
def test_bad_requests(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.generate("x", **{"max_new_tokens": 5, **kwargs})


def test_bad_prompts_and_paths(lm, tmp_path):
    with pytest.raises(TypeError):
        lm.generate(["ok", 3])
    with pytest.raises(TypeError):
        lm.generate([])
    with pytest.raises(spark_model.FormatError, match="does not exist"):
        spark_model.load(tmp_path / "no-such-checkpoint")
    assert isinstance(lm.generate("", max_new_tokens=3), str)  # empty prompt: starts at BOS
