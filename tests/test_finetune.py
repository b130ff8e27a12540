"""`spark train --init`: fine-tuning a loaded model, in full or with LoRA adapters.

Checked against independent references: at learning rate 0 every exported weight is the
starting model's, bit for bit; one optimizer step equals a plain `jax.grad` of the
cross-entropy of the model's own forward followed by AdamW written out in float64 NumPy;
adapters merge as W + s A B in float64; a model without BOS sees its training documents
joined by one shared separator, as built by hand from its vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spark_model
from spark_model import ModelConfig, RopeScaling, checkpoint
from spark_model.bpe import BPETokenizer
from test_bpe import gguf_meta, trained  # noqa: F401 - a fixture
from test_train import MINI_FILES, VAL_PERMILLE, _assert_one_line_error, _cli
from train import lora as lora_mod
from train.config import TrainConfig
from train.corpus import load_corpus, stdlib_root
from train.data import _encode
from train.init import load_init
from train.trainer import Trainer

MINI = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
            rope_theta=10_000.0, rope_scaling=RopeScaling(), max_seq_len=256)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft_corpus")
    for rel in MINI_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_root() / rel, root / rel)
    return root


@pytest.fixture(scope="module")
def sp_base(small_tokenizer, tmp_path_factory) -> Path:
    """A random model with Spark's SentencePiece tokenizer, saved as a checkpoint."""
    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, **MINI)
    path = tmp_path_factory.mktemp("sp_base") / "ckpt"
    checkpoint.save(path, spark_model.init_model(cfg, seed=7), small_tokenizer)
    return path


@pytest.fixture(scope="module")
def bpe_base(trained, tmp_path_factory) -> Path:  # noqa: F811
    """A random model with a byte-level BPE that adds no BOS (as SmolLM2's)."""
    tok = BPETokenizer.from_gguf_metadata(gguf_meta(trained, **{
        "tokenizer.ggml.eot_token_id": 0}))
    assert not tok.add_bos and 0 in tok.end_ids
    cfg = ModelConfig(vocab_size=tok.vocab_size, **MINI)
    path = tmp_path_factory.mktemp("bpe_base") / "ckpt"
    checkpoint.save(path, spark_model.init_model(cfg, seed=8), tok)
    return path


def _train(capsys, out: Path, init: Path, corpus: Path, cache: Path, *extra) -> tuple[int, str]:
    return _cli(capsys, "--init", init, "--data", corpus, "--out", out, "--cache-dir", cache,
                "--seq-len", "64", "--batch-size", "4", "--val-permille", VAL_PERMILLE,
                "--eval-tokens", "500", "--line-samples", "6", "--no-progress", *extra)


def _params(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            checkpoint.flat_params(checkpoint.load_params(path)[1]).items()}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("lora", [None, "2"])
def test_learning_rate_zero_keeps_every_weight_bit_for_bit(capsys, tmp_path, sp_base,
                                                           corpus_dir, lora):
    extra = ["--lora", lora] if lora else []
    code, err = _train(capsys, tmp_path / "out", sp_base, corpus_dir, tmp_path / "cache",
                       "--steps", "3", "--lr", "0", *extra)
    assert code == 0, err
    before, after = _params(sp_base), _params(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(_bits(after[name]), _bits(before[name]), err_msg=name)
    # Held-out bits per byte before and after: the same model, the same number.
    b = [line for line in err.splitlines() if line.startswith("before training:")]
    d = [line for line in err.splitlines() if line.startswith("done:")]
    assert len(b) == 1 and len(d) == 1
    bpb_before = float(b[0].split(",")[1].split()[0])
    assert f"(before training: {bpb_before:.4f})" in d[0]
    assert f"{bpb_before:.4f} bits/byte" in d[0]
    # ... and the same greedy next lines on the held-out files.
    lines = b[0].split("; line completion ")[1]
    assert lines.endswith("(6 held-out lines)") and d[0].endswith("; line completion " + lines)
    evals = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in evals if r["kind"] == "eval" and r["full"]]
    assert [r["step"] for r in full] == [0, 3]
    assert full[0]["line_samples"] == 6 and full[0]["line_exact_match"] == full[1]["line_exact_match"]
    loaded = spark_model.load(tmp_path / "out")
    assert loaded.tokenizer.serialized() == spark_model.load(sp_base).tokenizer.serialized()


def _reference_loss(model_flat: dict, graphdef, treedef, names, tokens_bt) -> jax.Array:
    """Mean next-token cross-entropy of the model's plain full forward."""
    state = jax.tree_util.tree_unflatten(treedef, [model_flat[n] for n in names])
    logits = nnx.merge(graphdef, state)(tokens_bt[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def _adamw_first_step(params: dict, grads: dict, tc: TrainConfig, decay: dict) -> dict:
    """AdamW's first update after global-norm clipping, in float64."""
    g64 = {n: np.asarray(g, np.float64) for n, g in grads.items()}
    norm = np.sqrt(sum(np.sum(g * g) for g in g64.values()))
    clip = min(1.0, tc.clip / norm)
    out = {}
    for n, p in params.items():
        g = g64[n] * clip
        m_hat = (1 - tc.b1) * g / (1 - tc.b1)
        v_hat = (1 - tc.b2) * g * g / (1 - tc.b2)
        update = m_hat / (np.sqrt(v_hat) + 1e-8)
        if decay[n]:
            update = update + tc.weight_decay * np.asarray(p, np.float64)
        out[n] = np.asarray(p, np.float64) - tc.lr * update
    return out


@pytest.mark.parametrize("rank", [0, 3])
def test_one_step_equals_plain_grad_and_adamw(sp_base, rank):
    init = load_init(str(sp_base))
    tc = TrainConfig(init=str(sp_base), lora_rank=rank, seq_len=32, batch_size=2, steps=10,
                     warmup=0, lr=1e-3, clip=0.05, weight_decay=0.1)
    trainer = Trainer(init.cfg, tc, base=init.params if rank else None)
    params, opt = trainer.init(seed=5, start=None if rank else init.params)
    start = {n: np.asarray(v) for n, v in params.items()}
    rng = np.random.default_rng(0)
    batch = rng.integers(0, init.cfg.vocab_size, (2, 33)).astype(np.int32)

    graphdef, state = nnx.split(spark_model.load(sp_base).model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [checkpoint.param_name(p) for p, _ in leaves]
    base = {n: jnp.asarray(init.params[n]) for n in names}
    scale = tc.lora_scale

    def loss(trained):
        full = dict(base)
        if rank:  # W + s A B, written out here
            for name, (n_in, n_out) in lora_mod.target_dims(
                    {n: (v.shape, v.dtype) for n, v in base.items()}).items():
                delta = trained[name + ".lora_a"] @ trained[name + ".lora_b"]
                full[name] = base[name] + scale * delta.reshape(base[name].shape)
        else:
            full = trained
        return _reference_loss(full, graphdef, treedef, names, jnp.asarray(batch))

    want_loss, grads = jax.value_and_grad(loss)({n: jnp.asarray(v) for n, v in start.items()})
    grads = {n: np.asarray(g) for n, g in grads.items()}
    new, _, metrics = trainer.step(params, opt, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
    want = _adamw_first_step(start, grads, tc, trainer.mask)
    for n, w in want.items():
        got = np.asarray(new[n], np.float64)
        # The first Adam step is lr * g / (|g| + eps): where |g| is far above float32
        # noise the update is exact to rounding; elsewhere it is at most lr either way.
        big = np.abs(grads[n]) > 1e-4 * (np.abs(grads[n]).max() + 1e-30)
        np.testing.assert_allclose(got[big], w[big], atol=2e-6, rtol=1e-5, err_msg=n)
        assert np.all(np.abs(got - w) <= 2.001 * tc.lr), n
        if rank and n.endswith(".lora_b"):
            assert np.any(got != 0), n  # the adapters did move


def test_merge_matches_float64_and_zero_update_keeps_bits():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 2, 4)).astype(np.float32)  # attn.q layout (D, N, H)
    w[0, 0, 0] = -0.0
    a = rng.normal(size=(8, 3)).astype(np.float32)
    b = rng.normal(size=(3, 8)).astype(np.float32)
    base = {"blocks.0.attn.q": w, "embed": rng.normal(size=(5, 8)).astype(np.float32)}
    merged = lora_mod.merge_host(base, {"blocks.0.attn.q.lora_a": a,
                                        "blocks.0.attn.q.lora_b": b}, 0.5)
    want = w.astype(np.float64) + 0.5 * (a.astype(np.float64) @ b).reshape(w.shape)
    np.testing.assert_allclose(merged["blocks.0.attn.q"], want, rtol=1e-6, atol=1e-6)
    assert merged["embed"] is base["embed"]
    zero = lora_mod.merge_host(base, {"blocks.0.attn.q.lora_a": a,
                                      "blocks.0.attn.q.lora_b": np.zeros_like(b)}, 0.5)
    np.testing.assert_array_equal(_bits(zero["blocks.0.attn.q"]), _bits(w))
    traced = lora_mod.merge({k: jnp.asarray(v) for k, v in base.items()},
                            {"blocks.0.attn.q.lora_a": a, "blocks.0.attn.q.lora_b": b}, 0.5)
    np.testing.assert_allclose(np.asarray(traced["blocks.0.attn.q"]), want, rtol=1e-5,
                               atol=1e-5)


def test_documents_without_bos_share_one_separator(bpe_base, corpus_dir):
    tok = spark_model.load(bpe_base).tokenizer
    sep = tok.token_to_id("<|endoftext|>")
    docs = load_corpus([corpus_dir])[0][:3]
    stream, offsets = _encode(tok, docs, np.int32, packed=True)
    want = [sep]
    for d in docs:
        want += tok.encode(d.text) + [sep]
    assert stream.tolist() == want
    per_doc, offsets = _encode(tok, docs, np.int32)  # validation: each whole, both ends
    first = per_doc[offsets[0]:offsets[1]].tolist()
    assert first == [sep] + tok.encode(docs[0].text) + [sep]


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_refuses_a_changed_base(capsys, tmp_path, bpe_base,
                                                             corpus_dir):
    base = tmp_path / "base"
    shutil.copytree(bpe_base, base)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--steps", "4", "--save-every", "2", "--lora", "2", "--lr", "1e-2"]
    code, err = _train(capsys, out, base, corpus_dir, cache, *args)
    assert code == 0, err
    straight = _params(out)
    assert any(np.any(straight[n] != v) for n, v in _params(base).items())
    assert isinstance(spark_model.load(out).tokenizer, BPETokenizer)

    shutil.rmtree(out / "training" / "checkpoints" / "4")  # as if killed after step 2
    code, err = _cli(capsys, "--out", out, "--resume", "--cache-dir", cache, "--no-progress")
    assert code == 0, err
    assert "resumed from step 2" in err
    again = _params(out)
    for n in straight:
        np.testing.assert_array_equal(_bits(again[n]), _bits(straight[n]), err_msg=n)

    cfg, model = checkpoint.load_params(base)
    flat = {k: np.asarray(v) for k, v in checkpoint.flat_params(model).items()}
    flat["embed"] = flat["embed"] + 1.0
    tok = spark_model.load(base).tokenizer
    checkpoint.save(base, checkpoint.model_from_flat(cfg, flat), tok, overwrite=True)
    shutil.rmtree(out / "training" / "checkpoints" / "4")
    code, err = _cli(capsys, "--out", out, "--resume", "--cache-dir", cache, "--no-progress")
    assert code == 1
    _assert_one_line_error(err, "no longer holds the weights the LoRA run")


def test_cli_bad_inputs_for_init(capsys, tmp_path, sp_base, corpus_dir):
    common = ["--data", corpus_dir, "--cache-dir", tmp_path / "cache", "--no-progress",
              "--seq-len", "64"]
    cases = [
        (["--init", sp_base, "--preset", "tiny"], 2, "--preset and --init exclude each other"),
        (["--init", sp_base, "--set", "d_model=64"], 2, "an --init model keeps its own config"),
        (["--init", sp_base, "--vocab-size", "600"], 2, "an --init model keeps its own"),
        (["--init", sp_base, "--lora", "0"], 2, "--lora must be a rank of at least 1"),
        (["--lora", "4"], 2, "--lora adapts an existing model: give it with --init"),
        (["--init", sp_base, "--lora", "17"], 2, "--lora must be in [1, 16] for this model"),
        (["--init", sp_base, "--seq-len", "512"], 2,
         "--seq-len 512 exceeds the model's max_seq_len 256"),
        (["--init", tmp_path / "missing"], 1, "cannot load it"),
        (["--init", sp_base, "--lr", "-1"], 2, "--lr must be >= 0"),
    ]
    for i, (argv, want_code, needle) in enumerate(cases):
        code, err = _cli(capsys, "--out", tmp_path / f"o{i}", *common, *argv)
        assert code == want_code, (argv, err)
        _assert_one_line_error(err, needle)
    assert not any((tmp_path / f"o{i}").exists() for i in range(len(cases)))


def test_defaults_fit_the_run_length_and_fine_tuning():
    import argparse

    from train.cli import FINETUNE_LR, LORA_LR, add_arguments, settings_from_args

    parser = add_arguments(argparse.ArgumentParser())
    short = settings_from_args(parser.parse_args(["--out", "x", "--steps", "30"]))
    assert (short.warmup, short.eval_every, short.save_every) == (3, 6, 7)
    long = settings_from_args(parser.parse_args(["--out", "x", "--steps", "5000"]))
    assert (long.warmup, long.eval_every, long.save_every, long.lr) == (100, 250, 250, 2e-3)
    ft = settings_from_args(parser.parse_args(["--out", "x", "--init", "m"]))
    assert ft.lr == FINETUNE_LR and ft.init == "m" and ft.line_samples == 100
    assert short.line_samples == 0
    lo = settings_from_args(parser.parse_args(["--out", "x", "--init", "m", "--lora", "8"]))
    assert (lo.lr, lo.lora_rank, lo.lora_scale) == (LORA_LR, 8, 2.0)
    given = settings_from_args(parser.parse_args(["--out", "x", "--init", "m", "--lr", "0.5",
                                                  "--eval-every", "1"]))
    assert (given.lr, given.eval_every) == (0.5, 1)


def test_a_packed_model_trains_from_its_expanded_weights(capsys, tmp_path, sp_base, corpus_dir):
    packed = tmp_path / "q8"
    spark_model.load(sp_base, weights="q8_0").save(packed)
    code, err = _train(capsys, tmp_path / "out", packed, corpus_dir, tmp_path / "cache",
                       "--steps", "2", "--lr", "0")
    assert code == 0, err
    want = checkpoint.flat_params(spark_model.load(packed, weights="f32").model)
    got = _params(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(_bits(got[name]), _bits(np.asarray(w)), err_msg=name)
    assert any(np.any(got[n] != v) for n, v in _params(sp_base).items())  # q8_0 rounded them
