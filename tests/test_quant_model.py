"""A model with packed weights (spark_model/packing.py) against the same model with its
weights dequantized: the float64 NumPy forward, the full forward, and the decode engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spark_model
from spark_model import ModelConfig, RopeScaling, engine, init_model, kernels, packing, quant
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.transformer import full_logits

from reference import forward as reference_forward

FMTS = list(quant.FORMATS)
# Every matrix's input dimension a multiple of 32 (d_model, heads * head_dim, d_ff).
CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96, rope_theta=10_000.0, rope_scaling=RopeScaling())


def _peaky(cfg: ModelConfig, seed: int) -> spark_model.Transformer:
    """A random model with weights larger than the init's, so attention is far from uniform
    and the logits of different tokens far apart (biases get values of their own)."""
    rng = np.random.default_rng(seed)
    params = {k: (rng.normal(0, 0.5, v.shape).astype(np.float32) if k.endswith("_bias")
                  else np.asarray(v) * (4.0 if v.ndim > 1 else 1.0))
              for k, v in flat_params(init_model(cfg, seed=seed)).items()}
    return model_from_flat(cfg, params)


def _forward(model, tokens: np.ndarray) -> np.ndarray:
    """The full forward of one sequence, traced afresh (so it sees SPARK_AMX as set now)."""
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens[None])))[0]


def _check_forward(model, cfg, tokens, monkeypatch):
    """The packed model's full forward against the float64 NumPy forward of its dequantized
    weights: within float32 rounding through the float32 expansion (SPARK_AMX=0), and where
    its products of many rows run on AMX tiles (bfloat16 factors, relative error 2^-8 each)
    within 2% of the largest logit, the same top token wherever the reference's top two are
    further apart than that."""
    ref = reference_forward(_dequantized(model), cfg, tokens)
    monkeypatch.setenv("SPARK_AMX", "0")
    np.testing.assert_allclose(_forward(model, tokens), ref, rtol=2e-4,
                               atol=2e-4 * np.abs(ref).max())
    monkeypatch.delenv("SPARK_AMX")
    if not kernels.amx_usable():
        return ref
    ours, tol = _forward(model, tokens), 0.02 * np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    return ref


def _dequantized(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(packing.convert_model(model, "f32")).items()}


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_packed_forward_matches_float64_reference(fmt, tie, bias, monkeypatch):
    cfg = CFG.replace(tie_embeddings=tie, attn_bias=bias)
    packed = packing.convert_model(_peaky(cfg, seed=1), fmt)
    flat = flat_params(packed)
    held = packing.summary(flat)
    assert held == {fmt: 7 * cfg.n_layers + (1 if tie else 2),
                    "f32": 2 * cfg.n_layers + 1 + (3 * cfg.n_layers if bias else 0)}
    assert all(isinstance(flat[n], quant.PackedWeight) for n in flat if packing.packable(n))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 24)
    _check_forward(packed, cfg, tokens, monkeypatch)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_embedding_expands_only_the_gathered_rows_exactly(fmt, interleaved):
    packed = packing.convert_model(init_model(CFG.replace(vocab_size=112), seed=2), fmt)
    if interleaved:  # as a loaded model holds it
        packed = packing.interleave_model(packed)
        assert flat_params(packed)["embed"].interleaved
    tokens = jnp.asarray([[5, 0, 96, 5], [1, 2, 3, 4]])
    got = np.asarray(jax.jit(lambda m, t: m.embed_tokens(t))(packed, tokens))
    table = quant.dequantize(flat_params(packed)["embed"])
    np.testing.assert_array_max_ulp(got, table[np.asarray(tokens)], 1)  # q4_1: d*q + m fused


def _decode_hlo(m: spark_model.SparkModel) -> str:
    """The compiled generate program's HLO for one 16-token prompt and 8 new tokens."""
    ids = [[1] * 16]
    req, prompt_bp, len_b, consts = m._prepare([""], ids=ids, max_new_tokens=8,
                                               temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                               stop=None)
    cache = jax.eval_shape(lambda: m._take_cache(1))
    return engine.generate_jit.lower(m.graphdef, m.params, cache, prompt_bp, len_b, consts,
                                     engine.bucket(8)).as_text()


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_with_packed_weights_matches_dequantized_full_forward(fmt, small_tokenizer):
    """The engine (prefill, then the compiled token loop over native packed products):
    each greedy token is the argmax of the dequantized model's full forward over the text
    so far, except where that forward's top two logits are closer than the kernel's
    activation rounding can move them (it rounds activations to 8 bits per 32-block)."""
    cfg = CFG.replace(vocab_size=small_tokenizer.vocab_size)
    m = spark_model.SparkModel(packing.convert_model(_peaky(cfg, seed=3), fmt),
                               small_tokenizer, capacity=256)
    if kernels.usable(jnp.zeros((1,), jnp.float32)):
        assert "spark_qmatvec" in _decode_hlo(m)  # the native product, inside the program
    prompt = small_tokenizer.encode("def add(a, b):\n    return", bos=True)
    new = m.generate_tokens([prompt], 48, ignore_eos=True)[0]
    assert len(new) == 48
    ref_model = model_from_flat(cfg, _dequantized(m.model))
    seq = np.asarray(prompt + new)
    logits = np.asarray(full_logits(ref_model, jnp.asarray(seq[None])))[0]
    at = np.arange(len(prompt) - 1, len(seq) - 1)  # positions that chose each new token
    top2 = np.sort(logits[at], axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    tol = 0.05 * np.abs(logits).max()
    clear = margin > tol
    assert clear.mean() > 0.7, "too few positions with a clear winner: the check says little"
    chosen = logits[at, np.asarray(new)]
    assert (chosen >= top2[:, 1] - tol).all()  # never a token far below the best
    np.testing.assert_array_equal(np.asarray(new)[clear], logits[at].argmax(-1)[clear])


def test_decode_with_kernels_off_equals_dequantized_greedy(small_tokenizer):
    """Traced with the native kernels off (as SPARK_KERNELS=0 does), the packed products are
    dequantize-then-dot: the greedy tokens are exactly the dequantized model's."""
    cfg = CFG.replace(vocab_size=small_tokenizer.vocab_size, d_ff=128)  # its own programs
    base = _peaky(cfg, seed=4)
    packed = spark_model.SparkModel(packing.convert_model(base, "q4_0"), small_tokenizer,
                                    capacity=128)
    dense = spark_model.SparkModel(model_from_flat(cfg, _dequantized(packed.model)),
                                   small_tokenizer, capacity=128)
    prompt = small_tokenizer.encode("import os\n", bos=True)
    with kernels.disabled():
        assert "spark_qmatvec" not in _decode_hlo(packed)
        got = packed.generate_tokens([prompt], 40, ignore_eos=True)[0]
        want = dense.generate_tokens([prompt], 40, ignore_eos=True)[0]
    assert got == want
    seq = np.asarray(prompt + got)
    logits = np.asarray(full_logits(dense.model, jnp.asarray(seq[None])))[0]
    np.testing.assert_array_equal(logits[len(prompt) - 1:-1].argmax(-1), got)


def test_load_quantizes_a_float_checkpoint_and_dequantizes_a_packed_one(tmp_path, small_model,
                                                                        small_tokenizer):
    cfg = small_model.cfg
    path = spark_model.SparkModel(small_model, small_tokenizer).save(tmp_path / "f32")
    q = spark_model.load(path, weights="q8_0", capacity=64)
    assert q.weights == "q8_0" and q.source_info["weights"] == "q8_0"
    if kernels.usable(jnp.zeros((1,), jnp.float32)):  # held for the decode kernel
        assert flat_params(q.model)["blocks.0.mlp.up"].interleaved
    want = packing.convert_model(small_model, "q8_0")
    for name, value in flat_params(want).items():
        got = flat_params(q.model)[name]
        assert packing.format_of(got) == packing.format_of(value), name
        if packing.is_packed(value):
            np.testing.assert_array_equal(quant.to_gguf_blocks(got), quant.to_gguf_blocks(value))
    assert q.param_bytes < spark_model.load(path, capacity=64).param_bytes / 3
    back = spark_model.load(q.save(tmp_path / "q8"), weights="f32", capacity=64)
    assert back.weights == "f32"
    np.testing.assert_array_equal(np.asarray(flat_params(back.model)["blocks.0.mlp.up"]),
                                  _dequantized(want)["blocks.0.mlp.up"])
    assert cfg == back.config
    with pytest.raises(quant.QuantError, match=r"unknown weight format 'q5_0'"):
        spark_model.load(path, weights="q5_0")


def test_packed_shipped_model_batches_what_generate_returns():
    """spark-tiny at q8_0: a batch of prompts decodes each as it would alone (the kernel's
    rows are independent)."""
    m = spark_model.load(weights="q8_0", capacity=256)
    assert m.weights == "q8_0"
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]
    alone = [m.generate(p, max_new_tokens=24) for p in prompts]
    assert m.generate(prompts, max_new_tokens=24) == alone


@pytest.mark.xfail(strict=False, reason="with the v2 weights the q8_0 server once answered "
                   "one of three concurrent prompts with other text than generate alone (a "
                   "near-tied first token?); cause not yet found")
def test_packed_shipped_model_serves_what_generate_returns():
    import httpx

    from spark_model.serve.server import ServerThread

    m = spark_model.load(weights="q8_0", capacity=256)
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]
    alone = [m.generate(p, max_new_tokens=24) for p in prompts]
    from concurrent.futures import ThreadPoolExecutor

    with ServerThread(spark_model.load(weights="q8_0", capacity=256), max_batch=4,
                      max_queue=8, warmup=False) as srv:
        def ask(p):  # all at once: they share the server's decode steps
            return httpx.post(srv.url + "/v1/completions", timeout=120,
                              json={"prompt": p, "max_tokens": 24, "temperature": 0})

        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(ask, prompts))
    for r, want in zip(replies, alone):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_matrices_whose_input_is_not_whole_blocks_stay_float_and_say_so(monkeypatch):
    """d_model 48: every matrix reading the residual stream stays f32 (noted); the down
    projections (K = d_ff = 64) pack; the mixed model still matches the float64 forward."""
    cfg = CFG.replace(d_model=48, n_heads=2, n_kv_heads=1, head_dim=24, d_ff=64)
    notes: list[str] = []
    model = packing.convert_model(_peaky(cfg, seed=5), "q4_1", notes)
    flat = flat_params(model)
    packed = sorted(n for n, v in flat.items() if packing.is_packed(v))
    assert packed == [f"blocks.{i}.mlp.down" for i in range(2)]  # o reads N*H = 48 too
    assert any(n.startswith("blocks.0.attn.q stays f32: its input dimension 48") for n in notes)
    assert len(notes) == len(flat) - len(packed) - 5  # not the norms
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 20)
    ref = _check_forward(model, cfg, tokens, monkeypatch)
    # One token per step through the KV cache: the native products, packed and float mixed
    # in one layer, within the packed kernel's activation rounding of the same forward.
    from spark_model.kv_cache import init_cache

    step = jax.jit(lambda m, t, p, c: (lambda x, c2: (m.logits(x), c2))(*m.cached(t, p, c)))
    cache, steps = init_cache(cfg, 1, 64), []
    for i, t in enumerate(tokens):
        logits, cache = step(model, jnp.asarray([[t]]), jnp.asarray([[i]]), cache)
        steps.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(steps), ref, atol=0.05 * np.abs(ref).max(), rtol=0)
