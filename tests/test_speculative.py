"""Prompt-lookup speculative decoding: drafts against a plain-Python lookup, the verify
step's rows against one-token steps, and whole generations bitwise against plain decoding."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spark_model
from spark_model import ModelConfig, engine, generation, init_model, kernels, speculative
from spark_model.kv_cache import init_cache

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=96, rope_theta=10_000.0, rope_scaling=None)


def _reference_draft(hist: list[int], k: int) -> tuple[list[int] | None, int]:
    """The ids after the latest earlier occurrence of the last 3 (else 2) ids, or None."""
    for n in speculative.NGRAMS:
        if len(hist) <= n:
            continue
        key = hist[-n:]
        for i in range(len(hist) - n - 1, -1, -1):
            if hist[i:i + n] == key:
                return hist[i + n:i + n + k], n
    return None, 0


def test_propose_matches_a_plain_lookup():
    rng = np.random.default_rng(0)
    k, length = 4, 64
    for trial in range(200):
        n = int(rng.integers(1, length))
        hist = rng.integers(0, 3 if trial % 2 else 6, n).tolist()  # small alphabets: repeats
        arr = np.zeros((1, length), np.int32)
        arr[0, :n] = hist
        draft, found = speculative.propose(jnp.asarray(arr), jnp.asarray([n]), k)
        want, _ = _reference_draft(hist, k)
        assert bool(found[0]) == (want is not None), (hist, want)
        if want is not None:  # ids past the history are padding: only those before count
            assert np.asarray(draft)[0, :len(want)].tolist() == want


def test_row_exact_products_give_each_row_its_one_row_result():
    if not kernels.available():
        pytest.skip(kernels.status())
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((9, 256)), jnp.float32)
    w_kn = jnp.asarray(rng.standard_normal((256, 384)), jnp.float32)
    w_nk = jnp.asarray(rng.standard_normal((1000, 256)), jnp.float32)

    def both(x):
        return kernels.linear(x, w_kn), kernels.linear(x, w_nk, transposed=True)

    def exact(x):
        with kernels.row_exact():
            return both(x)

    for m in range(1, 10):
        many = jax.jit(exact)(x[:m])
        for r in range(m):
            one = jax.jit(both)(x[r:r + 1])
            for a, b in zip(many, one):
                np.testing.assert_array_equal(np.asarray(a[r]), np.asarray(b[0]))


@nnx.jit
def _step(model, tokens, positions, cache):
    x, cache = model.cached(tokens, positions, cache)
    return model.logits(x), cache


@nnx.jit
def _verify(model, tokens, positions, cache):
    with kernels.row_exact():
        x, cache = model.cached(tokens, positions, cache)
        return model.logits(x), cache


# SmolLM2's width: XLA reduced the norms' (B, T, 576) rows in another order than (B, 1, 576)
WIDE = ModelConfig(vocab_size=101, d_model=576, n_layers=1, n_heads=9, n_kv_heads=3,
                   head_dim=64, d_ff=96, rope_theta=10_000.0, rope_scaling=None)


@pytest.mark.parametrize("cfg, weights", [(CFG, None), (WIDE, None), (WIDE, "q4_1"),
                                          (WIDE, "q8_0")], ids=["f32", "wide", "wide-q4_1",
                                                                "wide-q8_0"])
def test_verify_rows_equal_one_token_steps_bitwise(cfg, weights):
    """k + 1 tokens per row in one row-exact call == k + 1 one-token steps, ragged rows."""
    if not kernels.available():
        pytest.skip(kernels.status())
    from spark_model import packing

    model = packing.convert_model(init_model(cfg, seed=5), weights)
    rng = np.random.default_rng(2)
    batch, t = 3, 6
    starts = np.array([5, 40, 17])
    toks = rng.integers(0, cfg.vocab_size, (batch, 64))
    cache = init_cache(cfg, batch, 256)
    _, cache = _step(model, jnp.asarray(toks), jnp.broadcast_to(jnp.arange(64), (batch, 64)),
                     cache)
    new = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, t)))
    pos = jnp.asarray(starts[:, None] + np.arange(t)[None, :])
    cache2 = jax.tree.map(jnp.copy, cache)
    many, _ = _verify(model, new, pos, cache)
    singles = []
    for j in range(t):
        logits, cache2 = _step(model, new[:, j:j + 1], pos[:, j:j + 1], cache2)
        singles.append(np.asarray(logits[:, 0]))
    np.testing.assert_array_equal(np.asarray(many), np.stack(singles, axis=1))


def _prompts(tok) -> list[list[int]]:
    """Repetitive code (drafts accepted) and shuffled words (drafts rejected)."""
    rng = np.random.default_rng(3)
    texts = []
    for name in ("stops.py", "sampling.py", "engine.py", "bpe_bytes.py"):
        src = (ROOT / "spark_model" / name).read_text()
        a = int(rng.integers(0, len(src) - 900))
        piece = src[a:a + 700]
        texts.append(piece + "\n\n# The same code again:\n" + piece[:80])
    words = (ROOT / "README.md").read_text().split()
    for _ in range(4):
        texts.append(" ".join(rng.choice(words, int(rng.integers(5, 60)))))
    return [tok.encode(t, bos=True) for t in texts]


def _run_both(m, ids, max_new, stop=(), end_bk=None, k=5):
    """Plain and speculative token ids for one batch, through the engine directly."""
    req = generation.check_request([""] * len(ids), max_new_tokens=max_new, temperature=0.0,
                                   top_k=0, top_p=1.0, seed=0, stop=list(stop))
    prompt_bp, len_b = generation.pad_prompts(ids, m.tokenizer.pad_id)
    end = m.end_id_vector() if end_bk is None else end_bk
    consts = generation.constants(req, len(ids), m.token_table, end)
    n_out = engine.bucket(max_new)
    out = []
    for spec in (False, True):
        cache = init_cache(m.config, len(ids), m.capacity)
        args = (m.graphdef, m.params, cache, jnp.asarray(prompt_bp), jnp.asarray(len_b),
                consts, n_out)
        if spec:
            state, sp = speculative.generate_jit(*args, k)
        else:
            state = engine.generate_jit(*args)
        tokens, counts = jax.device_get((state.tokens_bn, state.count_b))
        out.append([row[:n].tolist() for row, n in zip(tokens, counts)])
    return out[0], out[1], sp


@pytest.mark.slow
@pytest.mark.parametrize("weights", [
    "f32",
    # With the v1 checkpoint's weights a q8_0 verify call over 16 rows (two native groups of
    # 8) differed from one-token steps in the last bits (10 or 12 rows agreed); with v2's
    # it agrees. The cause was not found, so this pins the shipped weights' behaviour.
    "q8_0",
])
def test_speculative_greedy_is_bitwise_plain_decoding(weights):
    m = spark_model.load(weights=None if weights == "f32" else weights, capacity=1280)
    ids = _prompts(m.tokenizer)
    # Ragged batches mixing both kinds; end ids switched off: 256 tokens per row.
    # q8_0 runs one of the two batches, and the end-id and stop checks run in f32 only (the
    # suite's time): its packed products are the case the f32 run does not cover.
    none = np.full((engine.MAX_END_IDS,), -1, np.int32)
    total_accepted = 0
    for batch in (ids[0::2], ids[1::2])[:2 if weights == "f32" else 1]:
        plain, spec, sp = _run_both(m, batch, 256, end_bk=none)
        assert plain == spec
        assert all(len(r) == 256 for r in plain)
        total_accepted += int(np.sum(sp.accepted_b))
    assert total_accepted > (100 if weights == "f32" else 50)  # drafts really were taken
    if weights != "f32":
        return

    # End ids that fall mid-draft: each row ends at a token its plain output holds at
    # position 40 (or earlier, where that token first appears), and emits nothing after.
    plain, _, _ = _run_both(m, ids[:4], 64, end_bk=none)
    end_bk = np.full((4, engine.MAX_END_IDS), -1, np.int32)
    end_bk[:, 0] = [row[40] for row in plain]
    a, b, _ = _run_both(m, ids[:4], 64, end_bk=end_bk)
    assert a == b and all(len(r) <= 41 for r in a)
    # Stop strings: the rows stop at the same token.
    text = m.tokenizer.decode(plain[0][30:34])
    stop = [text.strip()[:4] or "\n", "):"]
    a, b, _ = _run_both(m, ids[:4], 64, stop=stop, end_bk=none)
    assert a == b and len(a[0]) < 64


def test_generate_api_speculative_and_stats():
    m = spark_model.load(capacity=1024)
    src = (ROOT / "spark_model" / "stops.py").read_text()[:600]
    prompt = src + "\n# again\n" + src[:60]
    plain = m.generate(prompt, 48)
    spec = m.generate(prompt, 48, speculative="prompt_lookup", draft_tokens=4)
    assert spec == plain
    stats = m.last_stats
    assert stats["drafted_tokens"] > 0 and 0 < stats["accepted_tokens"] <= stats["drafted_tokens"]
    assert stats["steps"] < stats["new_tokens"]  # some steps emitted several tokens


@pytest.mark.parametrize("kw, msg", [
    ({"draft_tokens": 0}, "draft_tokens must be an integer in 1..8"),
    ({"draft_tokens": 9}, "draft_tokens must be an integer in 1..8"),
    ({"draft_tokens": "3"}, "draft_tokens must be an integer in 1..8"),
    ({"speculative": "draft"}, "speculative must be None, 'prompt_lookup' or a draft model"),
])
def test_bad_speculative_requests(kw, msg):
    m = spark_model.load(capacity=1024)
    kw = {"speculative": "prompt_lookup", **kw}
    with pytest.raises(speculative.SpeculationError, match=msg):
        m.generate("x", 4, **kw)
