"""The compiler on the shapes imported models have: q/k/v biases (Qwen2-style), an untied
head, plain and linear-scaled RoPE, and SmolLM2's non-power-of-two head counts (9 query
heads over 3 kv heads), scaled down. The placed program must reproduce the model's logits
and an independent float64 forward (tests/reference.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiler
from compiler import frontend
from compiler.execute import Runner, leaves
from compiler.ir import CompilerError
from compiler.verify import model_step
from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.checkpoint import flat_params, model_from_flat
from spark_model.kv_cache import init_cache
import reference

GRID = "grid:12x10:8KB"  # small cores: matrices are really split over rows and columns
PROMPT = [5, 17, 42, 7, 299, 0, 3, 128]

# Qwen2-like: biases, untied head, linear position interpolation, G = 3.
BIASED = ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                     head_dim=8, d_ff=80, rope_theta=1_000_000.0,
                     rope_scaling=RopeScaling(kind="linear", factor=4.0),
                     tie_embeddings=False, attn_bias=True)
# SmolLM2-135M's head layout (9 query heads, 3 kv heads, D = 9 x H) and FFN ratio,
# scaled down: tied embedding, plain RoPE with theta 100,000.
SMOL = ModelConfig(vocab_size=384, d_model=72, n_layers=2, n_heads=9, n_kv_heads=3,
                   head_dim=8, d_ff=192, rope_theta=100_000.0, rope_scaling=None)


def _random_model(cfg: ModelConfig, seed: int = 1):
    """init_model's weights, with non-zero biases and norm scales away from 1 (both are
    constants at initialisation, which would hide a dropped or misplaced one)."""
    flat = {k: np.asarray(v) for k, v in flat_params(init_model(cfg, seed=seed)).items()}
    rng = np.random.default_rng(seed)
    for name, a in flat.items():
        if name.endswith("_bias"):
            flat[name] = rng.normal(0.0, 0.5, a.shape).astype(a.dtype)
        elif name.endswith(".scale"):
            flat[name] = rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
    return model_from_flat(cfg, flat), flat


def _both_logits(plan, model, ids) -> tuple[np.ndarray, np.ndarray]:
    """Logits at every position of `ids`, (T, V): the placed program's and the model's
    own cached decode step's, each fed one token at a time."""
    run, weights = Runner(plan), leaves(plan, model)
    cache_plan, cache_model = init_cache(plan.cfg, 1, 64), init_cache(plan.cfg, 1, 64)
    ours, own = [], []
    for pos, tok in enumerate(ids):
        t, p = jnp.array([[tok]], jnp.int32), jnp.array([[pos]], jnp.int32)
        logits, cache_plan = run(weights, t, p, cache_plan)
        ours.append(np.asarray(logits[0, -1], np.float64))
        logits, cache_model = model_step(model, t, p, cache_model)
        own.append(np.asarray(logits[0, -1], np.float64))
    return np.stack(ours), np.stack(own)


def test_biases_ride_along_with_the_rotary_vector_op():
    g = frontend.build_graph(BIASED)
    compiler.check_graph(g)  # every parameter owned exactly once
    op = g.op("blocks.1.attn.bias+rotary")
    assert op.kind == "vector" and op.layer == 1 and op.roles == ("bias", "rotary")
    assert op.params == tuple(f"blocks.1.attn.{p}_bias" for p in "qkv")
    assert set(op.inputs) == {f"blocks.1.attn.{p}" for p in "qkv"}  # after the projections
    assert g.op("lm_head").kind == "matvec" and g.op("embed.lookup").shares is None
    plain = frontend.build_graph(SMOL)
    assert "blocks.1.attn.rotary" in {o.name for o in plain.ops}
    assert not any("bias" in o.roles for o in plain.ops)


def test_vector_work_reads_parameters_only_element_wise():
    """A rank-2 parameter broadcast and added is a bias; one reduced is refused."""
    x = jax.ShapeDtypeStruct((1, 1, 3, 4), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 4), jnp.float32)

    def build(f):
        closed = jax.make_jaxpr(f)(w, x)
        return frontend._Builder(closed, ["b"], [w]).build()

    (op,) = build(lambda b, x: x + b)
    assert op.kind == "vector" and op.params == ("b",) and op.roles == ("bias",)
    with pytest.raises(CompilerError, match="parameter b is used by 'reduce_sum'"):
        build(lambda b, x: x * b.sum(0))


@pytest.mark.parametrize("cfg", [BIASED, SMOL], ids=["bias-untied-linear", "smollm2-heads"])
def test_placed_program_reproduces_imported_shapes(cfg):
    model, flat = _random_model(cfg)
    plan = compiler.compile(cfg, GRID, context=256)
    assert plan.regions[plan.host[plan.graph.ops[-1].name]].tiling.pr > 1  # K split
    attn = next(o for o in plan.graph.ops if o.kind == "attention")
    assert attn.heads == (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    assert plan.regions[attn.name].tiling.pc % cfg.n_kv_heads == 0  # a block per kv head

    ours, own = _both_logits(plan, model, PROMPT)
    assert np.abs(ours - own).max() < 1e-4  # the model's own decode step
    ref = reference.forward(flat, cfg, np.array(PROMPT))  # float64, no shared code
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, scale)
    if cfg.attn_bias:  # the biases really change the answer
        unbiased = {k: (0 * v if k.endswith("_bias") else v) for k, v in flat.items()}
        assert np.abs(ours - reference.forward(unbiased, cfg, np.array(PROMPT))).max() \
            > 100 * 1e-4 * max(1.0, scale)


def test_cli_verifies_a_biased_checkpoint_at_its_own_context(tmp_path, small_tokenizer, capsys):
    """`spark compile --checkpoint DIR --verify` with no --context: the model's own
    max_seq_len is reserved (imported models have far fewer positions than 128K)."""
    import spark_model
    from spark_model.cli import main as spark_main

    cfg = BIASED.replace(vocab_size=small_tokenizer.vocab_size, max_seq_len=256)
    model, _ = _random_model(cfg)
    path = spark_model.SparkModel(model, small_tokenizer).save(tmp_path / "ckpt")
    assert spark_main(["compile", "--checkpoint", str(path), "--target", GRID,
                       "--verify", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["verified_positions"] >= 10 and s["max_abs_logit_diff"] < 1e-4
    assert compiler.compile(cfg, GRID).context == 256
