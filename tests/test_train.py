"""The training pipeline: corpus split and dedup, token cache, resumable data order, the
block-causal kernel, sharded steps (4 fake CPU devices), kill/resume, CLI errors, and an
end-to-end run whose directory loads with spark_model.load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import ModelConfig, RopeScaling
from spark_model.checkpoint import load_params
from train import cli, corpus, data, loop

REPO = Path(__file__).resolve().parent.parent
MINI = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
        "d_ff": 64}
ROPE = {"rope_theta": 500_000.0, "rope_scaling": RopeScaling()}
MINI_ARGS = [a for k, v in MINI.items() for a in ("--set", f"{k}={v}")]
# A few stdlib modules that exist in every CPython 3.10+.
MINI_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
              "json/tool.py", "textwrap.py", "string.py", "bisect.py", "heapq.py",
              "fnmatch.py", "colorsys.py", "shlex.py", "glob.py", "keyword.py", "numbers.py",
              "abc.py", "copy.py", "queue.py", "sched.py", "this.py"]
VAL_PERMILLE = 250  # a small corpus needs a larger share to hold out some files


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.pop("SPARK_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini_corpus")
    std = corpus.stdlib_root()
    for rel in MINI_FILES:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(std / rel, dest)
    names = [d.name for d in corpus.load_corpus([root])[0]]
    assert any(corpus.is_validation(n, VAL_PERMILLE) for n in names)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spark_cache")


def _mini_config(mini_corpus: Path, **kw) -> loop.TrainConfig:
    base = dict(overrides=tuple(sorted(MINI.items())), vocab_size=384,
                data=(str(mini_corpus),), val_permille=VAL_PERMILLE, seq_len=64, batch_size=8,
                steps=12, lr=5e-3, warmup=2, log_every=2, eval_every=6, eval_tokens=2000,
                save_every=6, keep=2)
    base.update(kw)
    return loop.TrainConfig(**base)


# ---- corpus ---------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_by_name():
    docs, stats = corpus.load_corpus()  # the stdlib
    assert stats.kept == len(docs) > 1000
    train1, val1 = corpus.split_corpus(docs)
    train2, val2 = corpus.split_corpus(corpus.load_corpus()[0])
    assert [d.name for d in val1] == [d.name for d in val2]
    assert [d.name for d in train1] == [d.name for d in train2]
    assert not {d.name for d in train1} & {d.name for d in val1}
    assert not {d.sha256 for d in train1} & {d.sha256 for d in val1}
    assert len(train1) + len(val1) == len(docs)
    assert 0.01 < len(val1) / len(docs) < 0.04
    # The rule, recomputed independently: sha256 of the name relative to the stdlib root.
    for d in docs[:200]:
        h = int(hashlib.sha256(d.name.encode()).hexdigest()[:16], 16)
        assert (h % 1000 < 20) == (d in val1)
    files = corpus.validation_files()
    assert files == [d.path for d in val1]
    assert all(f.is_file() for f in files)


def test_dedup_skips_and_jsonl(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "src" / "pkg" / "b.py").write_text("x = 1\n")  # copy of a.py
    (tmp_path / "src" / "pkg" / "c.py").write_text("y = 2\n")
    (tmp_path / "src" / "latin.py").write_bytes(b"s = '\xe9t\xe9'\n")  # not UTF-8
    (tmp_path / "src" / "empty.py").write_text("")
    (tmp_path / "src" / "notes.txt").write_text("not python")  # ignored: not .py
    jl = tmp_path / "more.jsonl"
    jl.write_text("\n".join([json.dumps({"text": "z = 3\n"}),
                             json.dumps({"content": "w = 4\n", "path": "w.py"}),
                             json.dumps({"content": "x = 1\n"}),  # copy of a.py
                             "{not json",
                             json.dumps({"other": 1})]) + "\n")
    docs, stats = corpus.load_corpus([tmp_path / "src", jl])
    assert [d.name for d in docs] == ["a.py", "pkg/c.py", "more.jsonl:1", "w.py"]
    assert (stats.seen, stats.duplicates, stats.non_utf8, stats.empty, stats.bad_records) \
        == (10, 2, 1, 1, 2)
    assert docs[0].path == tmp_path / "src" / "a.py" and docs[2].path is None
    assert "latin.py (non_utf8)" in stats.skipped_examples
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.load_corpus([tmp_path / "missing"])


# ---- token cache and iterator ---------------------------------------------------------

def test_token_cache_layout_reuse_and_rebuild(mini_corpus, cache_dir, tmp_path):
    docs, _ = corpus.load_corpus([mini_corpus])
    tr, va = corpus.split_corpus(docs, VAL_PERMILLE)
    tok = data.train_or_load_tokenizer(tr, 384, cache_dir)
    assert data.train_or_load_tokenizer(tr, 384, cache_dir).serialized() == tok.serialized()
    d1, built1 = data.build_token_cache(tr, va, tok, 64, tmp_path)
    d2, built2 = data.build_token_cache(tr, va, tok, 64, tmp_path)
    assert built1 and not built2 and d1.path == d2.path
    assert d1.train.dtype == np.uint16 and isinstance(d1.train, np.memmap)
    # BOS doc EOS BOS doc EOS ...: the stream is exactly the documents in order.
    expect = [i for d in tr for i in tok.encode(d.text, bos=True, eos=True)]
    assert d1.train.tolist() == expect
    assert d1.n_sequences == (len(expect) - 1) // 64
    np.testing.assert_array_equal(d1.sequences(np.array([3])), [expect[192:257]])
    assert d1.val_bytes.tolist() == [len(d.text.encode()) for d in va]
    # Any change of seq_len, content or tokenizer gives a new entry.
    assert data.build_token_cache(tr, va, tok, 32, tmp_path)[1]
    changed = [corpus._doc(tr[0].name, tr[0].text + "\n# edit\n", None)] + tr[1:]
    assert data.build_token_cache(changed, va, tok, 64, tmp_path)[1]
    tok2 = data.train_or_load_tokenizer(tr, 400, cache_dir)
    assert data.build_token_cache(tr, va, tok2, 64, tmp_path)[1]
    assert len(list(tmp_path.glob("tokens-*"))) == 4
    assert not list(tmp_path.glob(".tokens-*"))  # no half-built entries left


def test_iterator_resume_and_epochs(mini_corpus, cache_dir):
    docs, _ = corpus.load_corpus([mini_corpus])
    tr, va = corpus.split_corpus(docs, VAL_PERMILLE)
    tok = data.train_or_load_tokenizer(tr, 384, cache_dir)
    d, _ = data.build_token_cache(tr, va, tok, 64, cache_dir)
    n = d.n_sequences
    bs = max(1, n // 3 + 1)  # batches straddle the epoch boundary
    it = data.BatchIterator(d, bs, seed=7)
    straight = [it.next() for _ in range(7)]
    resumed = data.BatchIterator(d, bs, seed=7, position=3 * bs)
    for b in straight[3:]:
        np.testing.assert_array_equal(resumed.next(), b)
    assert resumed.state() == it.state() == {"position": 7 * bs, "seed": 7, "n_sequences": n}
    # Each epoch visits every packed sequence exactly once, in a seed-dependent order.
    first = data.BatchIterator(d, 1, seed=7).indices(0, n)
    assert sorted(first.tolist()) == list(range(n))
    assert first.tolist() != data.BatchIterator(d, 1, seed=8).indices(0, n).tolist()


# ---- the train step -------------------------------------------------------------------

def test_training_loss_and_its_gradient_equal_the_full_forward(small_model):
    """train.loss.token_nll (block-causal kernel, chunked logits under checkpoint) against
    the model's plain forward with optax's cross-entropy: values and parameter gradients."""
    import optax
    from flax import nnx

    from train.loss import token_nll

    rng = np.random.default_rng(0)
    v = small_model.cfg.vocab_size
    x = jnp.asarray(rng.integers(0, v, (2, 48)), jnp.int32)
    y = jnp.asarray(rng.integers(0, v, (2, 48)), jnp.int32)
    graphdef, params = nnx.split(small_model)

    def mean_loss(nll_fn):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean(nll_fn(nnx.merge(graphdef, p)))))(params)

    got, got_g = mean_loss(lambda m: token_nll(m, x, y, chunk_rows=20))
    ref, ref_g = mean_loss(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_grad_accumulation_and_decay_mask():
    cfg = ModelConfig(vocab_size=384, **MINI, **ROPE)
    batch = np.random.default_rng(0).integers(0, 384, (8, 33)).astype(np.int32)
    out = []
    for accum in (1, 4):
        tc = loop.TrainConfig(seq_len=32, batch_size=8, grad_accum=accum, steps=10, warmup=1,
                              lr=1e-2)
        tr = loop.Trainer(cfg, tc)
        p, o = tr.init(0)
        p, o, m = tr.step(p, o, batch)
        p, o, m = tr.step(p, o, batch[::-1])
        out.append((float(m["loss"]), tr.host_params(p)))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-5)
    for name in out[0][1]:
        np.testing.assert_allclose(out[0][1][name], out[1][1][name], atol=1e-5)
    # Fresh params are init_model's; decay skips norms and the embedding.
    from spark_model.transformer import init_model
    from spark_model.checkpoint import flat_params
    p0 = tr.host_params(tr.init(0)[0])
    for name, x in flat_params(init_model(cfg, 0)).items():
        np.testing.assert_array_equal(p0[name], np.asarray(x))
    assert not tr.mask["embed"] and not tr.mask["final_norm.scale"]
    assert tr.mask["blocks.0.attn.q"] and tr.mask["blocks.1.mlp.down"]


def test_bf16_compute_keeps_f32_master_weights():
    cfg = ModelConfig(vocab_size=384, **MINI, **ROPE)
    batch = np.random.default_rng(0).integers(0, 384, (8, 33)).astype(np.int32)
    losses = {}
    for bf16 in (False, True):
        tc = loop.TrainConfig(seq_len=32, batch_size=8, steps=10, warmup=1, bf16=bf16)
        tr = loop.Trainer(cfg, tc)
        p, o = tr.init(0)
        p, o, m = tr.step(p, o, batch)
        losses[bf16] = float(m["loss"])
        assert all(x.dtype == jnp.float32 for x in p.values())
    assert np.isfinite(losses[True]) and losses[True] == pytest.approx(losses[False], abs=0.05)


SHARDED_SCRIPT = r"""
import json, os, sys
import jax, numpy as np
from spark_model import ModelConfig, RopeScaling
from train.config import TrainConfig
from train.sharding import make_mesh
from train.trainer import Trainer
assert len(jax.devices()) == 4, jax.devices()
cfg = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, rope_theta=500_000.0, rope_scaling=RopeScaling())
rng = np.random.default_rng(0)
batches = [rng.integers(0, 384, (8, 33)).astype(np.int32) for _ in range(2)]
res = {}
for name, devs, fsdp in [("single", jax.devices()[:1], False), ("dp", jax.devices(), False),
                         ("fsdp", jax.devices(), True)]:
    tr = Trainer(cfg, TrainConfig(seq_len=32, batch_size=8, steps=10, warmup=1, lr=1e-2,
                                  fsdp=fsdp), make_mesh(devs))
    p, o = tr.init(0)
    losses = []
    for b in batches:
        p, o, m = tr.step(p, o, b)
        losses.append(float(m["loss"]))
    res[name] = {"losses": losses, "params": tr.host_params(p),
                 "devices": len(p["embed"].sharding.device_set),
                 "embed_shard": list(p["embed"].addressable_shards[0].data.shape),
                 "mu_shard": list(o[1][0].mu["embed"].addressable_shards[0].data.shape)}
out = {}
for name in ("dp", "fsdp"):
    out[name] = {
        "loss_diff": max(abs(a - b) for a, b in zip(res[name]["losses"], res["single"]["losses"])),
        "param_diff": max(float(np.max(np.abs(res[name]["params"][k] - res["single"]["params"][k])))
                          for k in res["single"]["params"]),
        "devices": res[name]["devices"], "embed_shard": res[name]["embed_shard"],
        "mu_shard": res[name]["mu_shard"]}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
    env = _env(tmp_path)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name in ("dp", "fsdp"):
        assert res[name]["devices"] == 4
        assert res[name]["loss_diff"] < 1e-5 and res[name]["param_diff"] < 1e-5, res
    assert res["dp"]["embed_shard"] == [384, 32]  # replicated
    assert res["fsdp"]["embed_shard"] == [96, 32] == res["fsdp"]["mu_shard"]  # sharded


# ---- kill and resume ------------------------------------------------------------------

def _train_cmd(out: Path, mini_corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "--out", str(out), "--data", str(mini_corpus),
            "--cache-dir", str(cache), "--vocab-size", "384", "--val-permille",
            str(VAL_PERMILLE), "--seq-len", "32", "--batch-size", "4", "--steps", "20",
            "--warmup", "3", "--lr", "5e-3", "--save-every", "10", "--eval-every", "0",
            "--log-every", "5", "--no-progress", *MINI_ARGS, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--target-context", "4K")], ids=["plain", "pose"])
def test_kill_and_resume_is_bitwise_identical(tmp_path, mini_corpus, cache_dir, extra):
    env = _env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env_kill = dict(env, **{loop.KILL_ENV: "10"})
    # Both first runs at once: most of their time is single-threaded compilation.
    p1 = subprocess.Popen(_train_cmd(straight, mini_corpus, cache_dir, *extra), env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p2 = subprocess.Popen(_train_cmd(killed, mini_corpus, cache_dir, *extra), env=env_kill,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err1, err2 = p1.communicate(timeout=600)[1], p2.communicate(timeout=600)[1]
    assert p1.returncode == 0, err1[-3000:]
    assert p2.returncode == -signal.SIGKILL, err2[-3000:]
    steps = sorted(int(p.name) for p in (killed / "training" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps == [10]
    assert json.loads((killed / "config.json").read_text())["extra"]["step"] == 10
    assert (json.loads((killed / "config.json").read_text())["extra"]["train"]
            .get("target_context")) == (4096 if extra else None)
    # Resume with no settings repeated: they come from the run directory.
    p3 = subprocess.run([sys.executable, "-m", "train", "--out", str(killed), "--resume",
                         "--cache-dir", str(cache_dir), "--no-progress"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "resumed from step 10" in p3.stderr
    _, a = load_params(straight)
    _, b = load_params(killed)
    from spark_model.checkpoint import flat_params
    fa, fb = flat_params(a), flat_params(b)
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)

    def train_losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                .read_text().splitlines()) if r["kind"] == "train"]
    assert train_losses(straight) == train_losses(killed)
    assert [s for s, _ in train_losses(killed)] == [5, 10, 15, 20]


# ---- the CLI: errors and an end-to-end run ---------------------------------------------

@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, mini_corpus, cache_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    summary = loop.train(_mini_config(mini_corpus), out, cache_dir=cache_dir, progress=False)
    return out, summary


def test_end_to_end_run_dir_loads(e2e_run, mini_corpus):
    import spark_model

    out, summary = e2e_run
    for name in ("config.json", "tokenizer.model", "params", "manifest.json", "metrics.jsonl",
                 "training/run.json", "training/tokenizer.model"):
        assert (out / name).exists(), name
    import importlib.util
    if importlib.util.find_spec("matplotlib") is not None:  # optional dependency
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["plotted"]
    assert sorted(int(p.name) for p in (out / "training" / "checkpoints").iterdir()) == [6, 12]
    m = spark_model.load(out)
    assert m.config == ModelConfig.preset("tiny", vocab_size=384, **MINI)
    # Logits of the loaded model equal those of the trained parameters.
    tr = loop.Trainer(m.config, _mini_config(mini_corpus))
    trained = tr.tree.model({k: jnp.asarray(v) for k, v in tr.host_params(
        summary["params"]).items()})
    ids = m.tokenizer.encode("def add(a, b):\n    return a + b\n", bos=True)
    np.testing.assert_allclose(np.asarray(m.logits([ids])),
                               np.asarray(trained(jnp.asarray([ids]))), atol=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {(r["kind"], r.get("full")) for r in records}
    assert kinds == {("train", None), ("eval", False), ("eval", True)}
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8, 10, 12]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in train_recs)
    final = records[-1]
    assert final["full"] and final["step"] == 12 and final["val_docs"] >= 1
    assert final["val_bpb"] == pytest.approx(
        final["val_loss"] * final["val_tokens"] / (final["val_bytes"] * np.log(2)))


def test_validation_bpb_agrees_with_eval_bpb(e2e_run, mini_corpus):
    """The training loop's bits per byte equal eval/bpb.py's on the same held-out files."""
    bpb = pytest.importorskip("eval.bpb")
    import spark_model

    out, _ = e2e_run
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    files = corpus.validation_files([mini_corpus], VAL_PERMILLE)
    assert len(files) == final["val_docs"]
    ref = bpb.bits_per_byte(spark_model.load(out), files, seq_len=64, batch=8)
    assert ref["bytes"] == final["val_bytes"]
    assert ref["bits_per_byte"] == pytest.approx(final["val_bpb"], rel=1e-4)


def test_resume_with_more_steps_extends_the_run(tmp_path, e2e_run, mini_corpus, cache_dir):
    """--resume with a larger --steps continues from the last checkpoint on a cosine over the
    new total; earlier metrics stay, and run.json records the new length."""
    src, _ = e2e_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = (out / "metrics.jsonl").read_text().splitlines()
    tc = _mini_config(mini_corpus, steps=16)
    summary = loop.train(tc, out, resume=True, cache_dir=cache_dir, progress=False)
    assert summary["start_step"] == 12 and summary["step"] == 16
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before
    new = [json.loads(line) for line in after[len(before):]]
    train_recs = [r for r in new if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [14, 16]
    lo = tc.lr * tc.min_lr_ratio
    for r in train_recs:  # the cosine over 16 steps, written out
        frac = (r["step"] - 1 - tc.warmup) / (tc.steps - tc.warmup)
        assert r["lr"] == pytest.approx(lo + (tc.lr - lo) * 0.5 * (1 + np.cos(np.pi * frac)))
    assert new[-1]["kind"] == "eval" and new[-1]["full"] and new[-1]["step"] == 16
    run = json.loads((out / "training" / "run.json").read_text())
    assert run["settings"]["steps"] == 16 and run["extensions"] == [{"from": 12, "to": 16}]
    assert json.loads((out / "config.json").read_text())["extra"]["step"] == 16
    assert sorted(int(p.name) for p in (out / "training" / "checkpoints").iterdir()) == [12, 16]
    with pytest.raises(loop.TrainError, match="may only be extended"):
        loop.train(_mini_config(mini_corpus, steps=14), out, resume=True, cache_dir=cache_dir,
                   progress=False)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("spark train: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_cli_bad_inputs(tmp_path, capsys, e2e_run, mini_corpus, cache_dir):
    out, _ = e2e_run
    common = ["--cache-dir", cache_dir, "--no-progress"]
    code, err = _cli(capsys, "--out", tmp_path / "a", "--data", tmp_path / "nope", *common)
    assert code == 1
    _assert_one_line_error(err, f"data path {tmp_path / 'nope'} does not exist")

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "empty.py").write_text("")
    (tmp_path / "junk" / "latin.py").write_bytes(b"x = '\xff'\n")
    code, err = _cli(capsys, "--out", tmp_path / "b", "--data", tmp_path / "junk", *common)
    assert code == 1
    _assert_one_line_error(err, "empty corpus")

    code, err = _cli(capsys, "--out", tmp_path / "c", "--data", mini_corpus / "json" / "tool.py",
                     "--vocab-size", "5000", *common)
    assert code == 1
    _assert_one_line_error(err, "too large for this corpus")

    (tmp_path / "d").mkdir()
    code, err = _cli(capsys, "--out", tmp_path / "d", "--resume", *common)
    assert code == 1
    _assert_one_line_error(err, "no training checkpoint")

    code, err = _cli(capsys, "--out", out, "--resume", "--set", "d_model=64", *common)
    assert code == 1
    _assert_one_line_error(err, "holds a run with overrides=")
    code, err = _cli(capsys, "--out", out, "--resume", "--preset", "small", *common)
    assert code == 1
    _assert_one_line_error(err, "holds a run with preset='tiny', but this command asks for "
                                "preset='small'")

    code, err = _cli(capsys, "--out", out, *common)
    assert code == 1
    _assert_one_line_error(err, "already holds a training run; pass --resume")

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "precious.txt").write_text("keep me")
    code, err = _cli(capsys, "--out", tmp_path / "e", *common)
    assert code == 1
    _assert_one_line_error(err, "exists and is not a training run directory")
    assert (tmp_path / "e" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["precious.txt"]

    code, err = _cli(capsys, "--out", tmp_path / "f", "--steps", "10", "--warmup", "10",
                     *common)
    assert code == 2
    _assert_one_line_error(err, "--warmup must be in [0, --steps)")
    code, err = _cli(capsys, "--out", tmp_path / "f", "--batch-size", "6", "--grad-accum", "4",
                     *common)
    assert code == 2
    _assert_one_line_error(err, "must be a multiple of --grad-accum")
    code, err = _cli(capsys, "--out", tmp_path / "f", "--set", "colour=3", *common)
    assert code == 2
    _assert_one_line_error(err, "unknown config field")
    assert not (tmp_path / "a").exists() and not (tmp_path / "f").exists()


def test_default_warmup_fits_short_runs():
    import argparse

    from train.cli import add_arguments, settings_from_args

    parser = add_arguments(argparse.ArgumentParser())
    short = settings_from_args(parser.parse_args(["--out", "x", "--steps", "30"]))
    assert short.warmup == 3  # a tenth of the steps, not the default 100
    long = settings_from_args(parser.parse_args(["--out", "x", "--steps", "5000"]))
    assert long.warmup == 100
    given = settings_from_args(parser.parse_args(["--out", "x", "--steps", "30",
                                                  "--warmup", "0"]))
    assert given.warmup == 0
