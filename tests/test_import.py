"""Imported models end to end: a GGUF file and a Hugging Face directory load through
`spark_model.load`, `spark import` turns them into a checkpoint that gives the very same
model, and the logits equal the float64 NumPy reference on the original parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest

import spark_model
from reference import forward as reference_forward
from spark_model.cli import main as spark_main
from spark_model.formats.gguf_write import write_gguf
from spark_model.formats.hf_write import write_hf
from spark_model.formats.mapping import FormatError
from test_bpe import gguf_meta, hf_dir, trained  # noqa: F401  (trained is a fixture)
from test_formats_gguf import config, random_params

PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def model_and_params(trained):  # noqa: F811
    cfg = config(vocab_size=trained.get_vocab_size(), max_seq_len=512)
    return cfg, random_params(cfg, seed=5)


def _check_logits(m, cfg, params):
    ids = m.tokenizer.encode(PROMPT, bos=True)
    ours = np.asarray(m.logits(np.asarray([ids]))[0])
    np.testing.assert_allclose(ours, reference_forward(params, cfg, np.asarray(ids)),
                               atol=1e-4, rtol=1e-4)
    return ids, ours


def test_gguf_loads_and_imports_to_the_same_model(trained, model_and_params, tmp_path,  # noqa: F811
                                                  capsys):
    cfg, params = model_and_params
    path = write_gguf(tmp_path / "m.gguf", cfg, params, gguf_meta(trained))
    m = spark_model.load(path)
    assert m.source_info["kind"] == "gguf" and m.tokenizer.end_ids[0] == 2
    ids, logits = _check_logits(m, cfg, params)
    text = m.generate(PROMPT, 12)

    assert spark_main(["import", str(path), "--out", str(tmp_path / "ckpt")]) == 0
    again = spark_model.load(tmp_path / "ckpt")
    assert again.source_info["imported_from"]["format"] == "gguf"
    assert again.tokenizer.encode(PROMPT, bos=True) == ids
    np.testing.assert_array_equal(np.asarray(again.logits(np.asarray([ids]))[0]), logits)
    assert again.generate(PROMPT, 12) == text
    # An existing checkpoint is not replaced without --overwrite.
    assert spark_main(["import", str(path), "--out", str(tmp_path / "ckpt")]) != 0
    assert "already exists" in capsys.readouterr().err
    assert spark_model.load(tmp_path / "ckpt").generate(PROMPT, 12) == text


def test_hf_directory_loads(trained, model_and_params, tmp_path):  # noqa: F811
    cfg, params = model_and_params
    tok = hf_dir(tmp_path / "tok", trained, {"add_bos_token": False, "eos_token": "<|im_end|>"})
    path = write_hf(tmp_path / "hf", cfg, params, tokenizer=tok)
    m = spark_model.load(path)
    assert m.source_info["kind"] == "hf"
    _check_logits(m, cfg, params)


def test_what_is_not_a_model_is_named(tmp_path, monkeypatch):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(FormatError, match="not a GGUF model"):
        spark_model.load(junk)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="is empty"):
        spark_model.load(tmp_path / "empty.gguf")
    with pytest.raises(FormatError, match="no config.json"):
        spark_model.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError):
        spark_model.load(tmp_path)
    monkeypatch.setenv("SPARK_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="spark fetch smollm2-135m"):
        spark_model.load("smollm2-135m")
    with pytest.raises(FormatError, match="does not exist"):
        spark_model.load(tmp_path / "missing-model")


def test_bits_per_byte_starts_a_bos_less_document_at_end_of_text(trained):  # noqa: F811
    from spark_model.bpe import BPETokenizer

    from eval.bpb import document_ids

    tok = BPETokenizer.from_gguf_metadata(gguf_meta(trained))
    assert not tok.add_bos
    ids = document_ids(tok, "x = 1\n")
    assert tok.decode(ids[:1]) == "<|endoftext|>" and tok.decode(ids[1:-1]) == "x = 1\n"
    assert ids[-1] == ids[0]


def test_info_reads_configs_without_tensors(trained, model_and_params, tmp_path, capsys):  # noqa: F811
    from spark_model.formats.gguf import read_gguf_config

    cfg, params = model_and_params
    path = write_gguf(tmp_path / "m.gguf", cfg, params, gguf_meta(trained))
    assert read_gguf_config(path) == cfg
    hf = write_hf(tmp_path / "hf", cfg, params)
    for source in (path, hf):
        assert spark_main(["info", "--model", str(source), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"] == cfg.to_dict()
