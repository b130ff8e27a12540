"""PoSE training (train/pose.py): the position ids' rule, their path through the loss and the
train step (checked against the model's own forward), and the settings' errors."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spark_model import ModelConfig, RopeScaling
from spark_model.transformer import init_model
from train import pose
from train.config import RUN_FIELDS, SettingsError, TrainConfig, validate
from train.loss import token_nll
from train.trainer import Trainer

MINI = dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            d_ff=64, rope_theta=500_000.0, rope_scaling=RopeScaling())


# ---- the rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_positions_increase_in_contiguous_chunks_below_the_target(chunks):
    seq_len, target = 24, 300
    pos = pose.batch_positions(seq_len, target, seed=3, position=0, count=2000,
                               chunks=chunks, share=1.0)
    assert pos.shape == (2000, seq_len) and pos.dtype == np.int32
    steps = np.diff(pos.astype(np.int64), axis=1)
    assert (steps >= 1).all()  # strictly increasing
    assert ((steps > 1).sum(axis=1) <= chunks - 1).all()  # jumps only between chunks
    assert (pos[:, 0] == 0).all() and (pos.max(axis=1) < target).all()
    # Over many draws every id in [0, target) occurs, the last one included, and the
    # total skip is the largest of chunks - 1 uniform draws over [0, target - seq_len]
    # (uniform with two chunks): its mean is k / (k + 1) of the range for k draws.
    assert np.array_equal(np.unique(pos), np.arange(target))
    total_skip = (pos[:, -1] - (seq_len - 1)) / (target - seq_len)
    assert total_skip.max() == 1.0
    k = chunks - 1
    assert np.mean(total_skip) == pytest.approx(k / (k + 1), abs=0.03)
    assert np.mean(total_skip ** 2) == pytest.approx(k / (k + 2), abs=0.03)


def test_positions_are_a_function_of_seed_and_data_position():
    a = pose.batch_positions(32, 4096, seed=7, position=100, count=8, share=1.0)
    np.testing.assert_array_equal(a, pose.batch_positions(32, 4096, 7, 100, 8, share=1.0))
    # Row j is the sequence at position 100 + j whatever the batch it is drawn in.
    for j in range(8):
        np.testing.assert_array_equal(a[j], pose.batch_positions(32, 4096, 7, 100 + j, 1,
                                                                 share=1.0)[0])
    assert not np.array_equal(a, pose.batch_positions(32, 4096, 8, 100, 8, share=1.0))
    assert not np.array_equal(a, pose.batch_positions(32, 4096, 7, 101, 8, share=1.0))


def test_share_of_skipped_sequences():
    plain = np.arange(16)
    none = pose.batch_positions(16, 1000, 0, 0, 200, share=0.0)
    assert (none == plain).all()
    some = pose.batch_positions(16, 1000, 0, 0, 2000, share=0.75)
    skipped = np.mean([not np.array_equal(r, plain) for r in some])
    assert 0.72 < skipped < 0.78  # a skip of 0 leaves a few rows plain (~1 in 985)


# ---- through the loss and the train step ------------------------------------------------

def _model_and_data(seq_len=40, b=2):
    # Weights 5x the usual init: attention peaked enough for positions to matter clearly.
    model = init_model(ModelConfig(**MINI, init_std=0.1), seed=0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 384, (b, seq_len)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 384, (b, seq_len)), jnp.int32)
    return model, x, y


def test_token_nll_depends_only_on_relative_positions():
    """RoPE relativity, an independent check that positions reach the attention: a constant
    shift of every id leaves the loss unchanged (to f32 rounding of the larger angles),
    while moving one chunk changes it."""
    model, x, y = _model_and_data()
    nll = jax.jit(lambda p: token_nll(model, x, y, chunk_rows=16, positions_bt=p))
    base = jnp.broadcast_to(jnp.arange(40), x.shape)
    ref = np.asarray(jax.jit(lambda: token_nll(model, x, y, chunk_rows=16))())
    np.testing.assert_allclose(np.asarray(nll(base)), ref, rtol=0, atol=1e-6)
    # A float32 angle near 128K carries up to ~0.008 rad of rounding, hence the looser
    # tolerance there (measured then: 4e-5); spark_model.rotary's angles are exact.
    for shift, tol in ((1_000, 1e-5), (131_072 - 40, 5e-4)):
        np.testing.assert_allclose(np.asarray(nll(base + shift)), ref, rtol=0, atol=tol)
    skipped = base.at[:, 20:].add(5_000)
    assert np.max(np.abs(np.asarray(nll(skipped)) - ref)) > 0.05  # measured: 0.2
    np.testing.assert_array_equal(np.asarray(nll(skipped))[:, :20], ref[:, :20])  # causal


def _tiny_trainer(init_std: float = 0.02, **kw) -> Trainer:
    tc = TrainConfig(seq_len=32, batch_size=8, steps=10, warmup=1, lr=1e-2, **kw)
    return Trainer(ModelConfig(**MINI, init_std=init_std), tc)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_plain_step_is_bitwise_the_step_with_arange_positions(accum):
    batch = np.random.default_rng(1).integers(0, 384, (8, 33)).astype(np.int32)
    arange = np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))
    results = []
    for positions in (None, arange):
        tr = _tiny_trainer(grad_accum=accum)
        p, o = tr.init(0)
        for _ in range(2):
            p, o, m = tr.step(p, o, batch, positions)
        results.append((float(m["loss"]), float(m["grad_norm"]), tr.host_params(p)))
    assert results[0][:2] == results[1][:2]
    for name, a in results[0][2].items():
        np.testing.assert_array_equal(a, results[1][2][name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_pose_step_loss_is_the_full_forward_loss_at_those_positions(accum):
    """The step's loss (chunked, flash attention, micro-batches) against the model's own
    plain forward `model(inputs, positions)` with optax's cross-entropy."""
    tr = _tiny_trainer(init_std=0.1, grad_accum=accum, target_context=131_072)
    batch = np.random.default_rng(2).integers(0, 384, (8, 33)).astype(np.int32)
    positions = pose.batch_positions(32, 131_072, seed=0, position=0, count=8, share=1.0)
    assert positions.max() > 1_000  # the draw does reach far
    p, o = tr.init(0)
    model = tr.tree.model({k: jnp.asarray(v) for k, v in tr.host_params(p).items()})
    x, y = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])

    def ce(pos):
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            model(x, None if pos is None else jnp.asarray(pos)), y)))

    ref, plain = ce(positions), ce(None)
    assert abs(ref - plain) > 1e-3  # the positions matter for this check to mean anything
    tr.compile(p, o)
    _, _, m = tr.step(p, o, batch, positions)
    assert float(m["loss"]) == pytest.approx(ref, rel=1e-6)
    assert np.isfinite(float(m["grad_norm"]))


# ---- settings ---------------------------------------------------------------------------

def test_settings_errors_and_the_shipped_rope_range():
    validate(TrainConfig(target_context=131_072))  # tiny: theta 5e5, llama3 x8, 128K: fits
    assert pose.longest_wavelength(ModelConfig.preset("tiny")) > 131_072
    bad = [
        (dict(target_context=256), "--target-context 256 must exceed --seq-len 512"),
        (dict(target_context=512), "must exceed --seq-len 512"),
        (dict(target_context=262_144), "exceeds the model's max_seq_len 131072"),
        (dict(target_context=131_072, overrides=(("rope_scaling", None),
                                                 ("rope_theta", 10_000.0))),
         "beyond what the model's rope settings represent"),
        (dict(target_context=4096, pose_share=1.5), "--pose-share must be in [0, 1]"),
        (dict(target_context=4096, pose_chunks=1), "--pose-chunks must be in [2, --seq-len]"),
        (dict(pose_share=0.5), "need --target-context"),
    ]
    for kw, needle in bad:
        with pytest.raises(SettingsError) as e:
            validate(TrainConfig(**kw))
        assert needle in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    # Plain RoPE at theta 10,000 and head_dim 64 turns its slowest pair in ~47K tokens:
    # 32K still fits, which the wavelength rule says and a direct computation confirms.
    plain = (("rope_scaling", None), ("rope_theta", 10_000.0))
    validate(TrainConfig(target_context=32_768, overrides=plain))
    assert 2 * np.pi * 10_000.0 ** (62 / 64) == pytest.approx(
        pose.longest_wavelength(ModelConfig.preset("tiny", rope_scaling=None,
                                                   rope_theta=10_000.0)))


def test_cli_flags_and_old_runs_resume_as_plain():
    from train.cli import add_arguments, settings_from_args

    parser = add_arguments(argparse.ArgumentParser())
    tc = settings_from_args(parser.parse_args(["--out", "x", "--target-context", "128K",
                                               "--pose-share", "0.5"]))
    assert (tc.target_context, tc.pose_share, tc.pose_chunks) == (131_072, 0.5, 2)
    assert settings_from_args(parser.parse_args(["--out", "x", "--target-context",
                                                 "40000"])).target_context == 40_000
    assert settings_from_args(parser.parse_args(["--out", "x"])).target_context is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--target-context", "lots"])
    assert {"target_context", "pose_share", "pose_chunks"} <= set(RUN_FIELDS)
    # A run saved before these fields existed resumes as plain training.
    old = TrainConfig().to_json_dict()
    for k in ("target_context", "pose_share", "pose_chunks"):
        del old[k]
    assert TrainConfig.from_json_dict(old) == TrainConfig()
    assert TrainConfig.from_json_dict(tc.to_json_dict()) == tc


def test_cli_rope_range_error_is_one_line(tmp_path, capsys):
    from train import cli

    out = tmp_path / "run"
    code = cli.main(["--out", str(out), "--set", "rope_scaling=null", "--set",
                     "rope_theta=10000", "--target-context", "128K", "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spark train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--target-context 131072 is beyond what the model's rope settings represent" \
        in lines[0] and "47,117 tokens" in lines[0]
    assert not out.exists()
