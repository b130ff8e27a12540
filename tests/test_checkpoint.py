"""Save -> load round trips exactly; every kind of damage gives a message that names it."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import spark_model
from spark_model import CheckpointError
from spark_model.checkpoint import flat_params
from spark_model.transformer import full_logits


@pytest.fixture()
def saved(tmp_path, small_model, small_tokenizer):
    return spark_model.SparkModel(small_model, small_tokenizer).save(tmp_path / "ckpt")


def test_save_load_identical_logits(saved, small_model, small_tokenizer):
    loaded = spark_model.load(saved)
    assert loaded.config == small_model.cfg
    tokens = jnp.asarray([small_tokenizer.encode("def f(x):\n    return x + 1\n", bos=True)])
    np.testing.assert_array_equal(np.asarray(loaded.logits(tokens)),
                                  np.asarray(full_logits(small_model, tokens)))
    for name, value in flat_params(small_model).items():
        np.testing.assert_array_equal(np.asarray(flat_params(loaded.model)[name]),
                                      np.asarray(value))
    text = "x = 'ü'\n\tpass\r\n"
    assert loaded.tokenizer.encode(text) == small_tokenizer.encode(text)


def test_refuses_to_overwrite_without_asking(saved, small_model, small_tokenizer):
    with pytest.raises(CheckpointError, match="overwrite=True"):
        spark_model.SparkModel(small_model, small_tokenizer).save(saved)
    spark_model.SparkModel(small_model, small_tokenizer).save(saved, overwrite=True)
    spark_model.load(saved)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp dirs left


def test_failed_save_keeps_the_old_checkpoint(saved, small_model, small_tokenizer,
                                              monkeypatch):
    before = {p.relative_to(saved): p.read_bytes() for p in saved.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(small_tokenizer), "save", broken)
    with pytest.raises(OSError, match="disk full"):
        spark_model.SparkModel(small_model, small_tokenizer).save(saved, overwrite=True)
    after = {p.relative_to(saved): p.read_bytes() for p in saved.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def _largest_param_file(root):
    return max((p for p in (root / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def test_missing_directory(tmp_path):
    with pytest.raises(spark_model.FormatError, match="does not exist"):
        spark_model.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):  # the checkpoint reader's own
        spark_model.checkpoint.check(tmp_path / "nope")


def test_missing_parts(saved):
    shutil.rmtree(saved / "params")
    (saved / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError,
                       match=r"missing tokenizer.model or tokenizer.json \+ tokenizer_meta.json, params"):
        spark_model.load(saved)


def test_truncated_params(saved):
    f = _largest_param_file(saved)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        spark_model.load(saved)
    assert f.relative_to(saved).as_posix() in str(e.value)


def test_corrupted_params(saved):
    f = _largest_param_file(saved)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        spark_model.load(saved)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(spark_model.FormatError, match="not a GGUF model"):
        spark_model.load(tmp_path / "file")
    with pytest.raises(CheckpointError, match="is a directory"):
        spark_model.checkpoint.check(tmp_path / "file")
    with pytest.raises(spark_model.FormatError, match="no config.json"):
        spark_model.load(tmp_path)
    with pytest.raises(CheckpointError, match="missing config.json"):
        spark_model.checkpoint.check(tmp_path)


def test_bad_config(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["n_heads"] = 3
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.json"):
        spark_model.load(saved, verify=False)
