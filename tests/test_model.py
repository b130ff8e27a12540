"""The model against independent references: NumPy Llama, Llama 3.1 RoPE rule, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import ConfigError, ModelConfig, RopeScaling, init_model, param_count
from spark_model.transformer import full_logits
from spark_model.checkpoint import flat_params
from spark_model.layers import apply_rope, rope_frequencies

from reference import forward as reference_forward
from reference import llama31_inv_freq

# A model small enough to check in float64 loops, with every feature switched on
# (GQA with G=2, Llama 3.1 scaling, untied and tied heads).
SMALL = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=48, rope_theta=500_000.0, rope_scaling=RopeScaling())


@pytest.mark.parametrize("tie, bias, scaling", [
    (True, False, RopeScaling()), (False, False, None), (True, True, None),
    (True, False, RopeScaling(factor=4.0, kind="linear"))])
def test_forward_matches_numpy_reference(tie, bias, scaling):
    cfg = SMALL.replace(tie_embeddings=tie, attn_bias=bias, rope_scaling=scaling,
                        rope_theta=10_000.0)
    model = init_model(cfg, seed=1)
    # Larger weights than the init so attention is far from uniform; biases are zero at
    # init, so they get random values of their own.
    rng = np.random.default_rng(3)
    params = {k: (rng.normal(0, 0.5, v.shape).astype(np.float32) if k.endswith("_bias")
                  else np.asarray(v) * (5.0 if v.ndim > 1 else 1.0))
              for k, v in flat_params(model).items()}
    from spark_model.checkpoint import model_from_flat
    model = model_from_flat(cfg, params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 24)
    ours = np.asarray(full_logits(model, jnp.asarray(tokens[None])))[0]
    ref = reference_forward(params, cfg, tokens)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


def test_causality():
    cfg = SMALL
    model = init_model(cfg, seed=2)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20))
    base = np.asarray(full_logits(model, jnp.asarray(tokens)))
    for t in (0, 7, 19):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = np.asarray(full_logits(model, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # the past never moves
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-6  # the changed position does


@pytest.mark.parametrize("head_dim,theta", [(128, 500_000.0), (64, 500_000.0), (64, 10_000.0)])
def test_rope_scaling_matches_llama31_rule(head_dim, theta):
    cfg = ModelConfig.preset("llama3-8b")
    sc = cfg.rope_scaling
    ours = rope_frequencies(head_dim, theta, sc)
    ref = llama31_inv_freq(head_dim, theta, sc.factor, sc.low_freq_factor,
                           sc.high_freq_factor, sc.original_max_position)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    # All three bands are exercised at head_dim 128: kept, interpolated, divided.
    wavelen = 2 * np.pi / ref
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    assert np.any(ours == plain) and np.any(np.isclose(ours, plain / 8))
    if head_dim == 128:
        band = (wavelen >= 8192 / 4) & (wavelen <= 8192 / 1)
        assert band.any()


def test_rope_rotation_is_relative():
    """q.k after rotation depends on the position difference only, even at 128K."""
    freqs = rope_frequencies(64, 500_000.0, ModelConfig.preset("tiny").rope_scaling)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)

    def dot(m, n):
        qm = apply_rope(q, jnp.array([[m]]), freqs)
        kn = apply_rope(k, jnp.array([[n]]), freqs)
        return float(jnp.sum(qm * kn))

    assert dot(10, 3) == pytest.approx(dot(1010, 1003), rel=1e-4, abs=1e-4)
    # Near 128K a float32 angle would be off by up to 2^-7 rad (spark_model.rotary's are
    # exact); the looser tolerance there covers either.
    assert dot(10, 3) == pytest.approx(dot(131_000, 130_993), rel=2e-2, abs=2e-2)
    # Norms are preserved at any position.
    r = apply_rope(q, jnp.array([[131_071]]), freqs)
    assert float(jnp.linalg.norm(r)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


def test_preset_parameter_counts():
    # Published sizes, from shapes alone (nothing materialised).
    assert round(param_count(ModelConfig.preset("llama3-8b")) / 1e9, 2) == 8.03
    assert round(param_count(ModelConfig.preset("llama3-70b")) / 1e9, 1) == 70.6
    tiny, small = (param_count(ModelConfig.preset(p)) for p in ("tiny", "small"))
    assert 5e6 <= tiny <= 15e6
    assert 50e6 <= small <= 150e6
    # The materialised tiny model has exactly the abstract count.
    leaves = jax.tree.leaves(flat_params(init_model(ModelConfig.preset("tiny"))))
    assert sum(x.size for x in leaves) == tiny


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        SMALL.replace(n_heads=3)
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.preset("tiny", d_modle=128)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="positive integer"):
        SMALL.replace(n_layers=0)
    with pytest.raises(ConfigError, match="even"):
        SMALL.replace(head_dim=7)
    with pytest.raises(ConfigError, match="dtype"):
        SMALL.replace(dtype="float8")
    with pytest.raises(ConfigError, match="rope_scaling.kind"):
        RopeScaling(kind="yarn")
    with pytest.raises(ConfigError, match="attn_bias"):
        SMALL.replace(attn_bias=1)
    with pytest.raises(TypeError, match="rope_theta"):  # no silent default
        ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=48)
    assert ModelConfig.from_json(SMALL.to_json()) == SMALL


def test_bf16_compute_tracks_f32():
    model = init_model(SMALL, seed=4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, SMALL.vocab_size, (1, 16)))
    f32 = full_logits(model, tokens)
    from spark_model.checkpoint import model_from_flat
    bf16 = full_logits(model_from_flat(SMALL.replace(dtype="bfloat16"), flat_params(model)), tokens)
    assert bf16.dtype == jnp.float32  # logits are always f32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=5e-2)
