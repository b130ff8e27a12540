"""`spark export`: a Spark checkpoint written as GGUF and as a Hugging Face directory reads
back as the same model (logits, token ids, end ids, template), checked against the
checkpoint itself, the float64 NumPy reference and a plain-Python BPE reading the exported
vocabulary; existing paths are refused or replaced whole; what a format cannot hold is
refused by name."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as LibTokenizer

import spark_model
from reference import forward as reference_forward
from spark_model import ModelConfig, RopeScaling, checkpoint, cli, commands
from spark_model.bpe import BPETokenizer, TokenizerError
from spark_model.formats.export import export
from spark_model.formats.gguf import read_gguf, read_gguf_metadata
from spark_model.formats.mapping import FormatError
from spark_model.formats.tokenizer_export import SENTENCEPIECE_CAVEAT
from test_bpe import TRICKY, gguf_meta, hf_dir, metaspace_lib, reference, trained  # noqa: F401
from test_formats_gguf import config, random_params

TEXT = "def add(a, b):\n    return a + b\n"
SP_TRICKY = ["", "x", "  two  spaces\n\tTab", "héllo 日本語 😀", "a\u2581marker \u2581\u2581",
             "<s></s>", TEXT]


def _logits(cfg, params, tok, ids) -> np.ndarray:
    m = spark_model.SparkModel(checkpoint.model_from_flat(cfg, params), tok, capacity=64)
    return np.asarray(m.logits(np.asarray([ids]))[0])


@pytest.fixture(scope="module")
def bpe_ckpt(trained, tmp_path_factory):  # noqa: F811
    """A random model with a BOS-adding byte-level BPE tokenizer, saved as a checkpoint."""
    cfg = config(vocab_size=trained.get_vocab_size(), max_seq_len=512)
    params = random_params(cfg, seed=3)
    tok = BPETokenizer.from_gguf_metadata(gguf_meta(trained, **{
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eot_token_id": 0}))
    path = tmp_path_factory.mktemp("bpe") / "ckpt"
    checkpoint.save(path, checkpoint.model_from_flat(cfg, params), tok)
    return path, cfg, params, tok


@pytest.fixture(scope="module")
def sp_ckpt(small_tokenizer, tmp_path_factory):
    """A random model with Spark's SentencePiece tokenizer and Llama 3.1 rope scaling."""
    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, d_model=64, n_layers=2,
                      n_heads=2, n_kv_heads=1, head_dim=64, d_ff=96, rope_theta=500_000.0,
                      rope_scaling=RopeScaling(), max_seq_len=1024)
    params = random_params(cfg, seed=4)
    path = tmp_path_factory.mktemp("sp") / "ckpt"
    checkpoint.save(path, checkpoint.model_from_flat(cfg, params), small_tokenizer)
    return path, cfg, params, small_tokenizer


def _same_tokenizer(got, want, texts) -> None:
    for special in (False, True):
        assert [got.encode(t, bos=True, special=special) for t in texts] == \
            [want.encode(t, bos=True, special=special) for t in texts]
    assert (got.bos_id, got.end_ids, got.pad_id, got.add_bos, got.chat_template) == \
        (want.bos_id, want.end_ids, want.pad_id, want.add_bos, want.chat_template)
    ids = want.encode(TEXT)
    assert got.decode(ids) == want.decode(ids) == TEXT


def test_bpe_model_round_trips_through_gguf_and_hf(bpe_ckpt, tmp_path):
    path, cfg, params, tok = bpe_ckpt
    ids = tok.encode(TEXT, bos=True)
    want = reference_forward(params, cfg, np.asarray(ids))
    ours = _logits(cfg, params, tok, ids)
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)

    gguf = export(path, "gguf", tmp_path / "m.gguf")
    m = spark_model.load(gguf, capacity=64)
    assert m.config == cfg and m.tokenizer.pre == "smollm"
    np.testing.assert_allclose(np.asarray(m.logits(np.asarray([ids]))[0]), ours, atol=1e-5)
    _same_tokenizer(m.tokenizer, tok, TRICKY)
    # A plain-Python BPE reading only the exported vocabulary and merges agrees.
    meta = {k: v.tolist() if hasattr(v, "tolist") else v
            for k, v in read_gguf_metadata(gguf).items()}
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the three special tokens
    ref = reference(meta)
    assert [ref.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]

    hf = export(path, "hf", tmp_path / "hf")
    m = spark_model.load(hf, capacity=64)
    assert m.config == cfg and m.tokenizer.pre == "smollm"  # recognised from tokenizer.json
    np.testing.assert_allclose(np.asarray(m.logits(np.asarray([ids]))[0]), ours, atol=1e-5)
    _same_tokenizer(m.tokenizer, tok, TRICKY)
    # The files as the tokenizers library and transformers read them.
    lib = LibTokenizer.from_file(str(hf / "tokenizer.json"))
    assert lib.encode(TEXT).ids == ids  # the post-processor adds BOS, as add_bos says
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert (tc["add_bos_token"], tc["bos_token"], tc["eos_token"]) == \
        (True, "<|im_start|>", "<|im_end|>")
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == \
        list(tok.end_ids) == [2, 0]


def test_sentencepiece_model_round_trips(sp_ckpt, tmp_path):
    path, cfg, params, tok = sp_ckpt
    ids = tok.encode(TEXT, bos=True)
    ours = _logits(cfg, params, tok, ids)
    np.testing.assert_allclose(ours, reference_forward(params, cfg, np.asarray(ids)),
                               atol=1e-4, rtol=1e-4)

    with pytest.warns(UserWarning, match="U\\+2581"):
        gguf = export(path, "gguf", tmp_path / "m.gguf")
    imported = read_gguf(gguf)  # Llama 3.1 scaling travels as rope_freqs.weight
    assert imported.cfg.rope_scaling.kind == "llama3"
    np.testing.assert_allclose(_logits(imported.cfg, imported.params, tok, ids), ours, atol=1e-5)
    # The vocabulary as llama.cpp reads it: every piece, score and piece type, Spark's ids.
    meta = imported.tokenizer_source[1]
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert list(meta["tokenizer.ggml.tokens"]) == pieces
    types = list(meta["tokenizer.ggml.token_type"])
    assert types[:4] == [3, 2, 3, 3] and types[4:260] == [6] * 256
    assert set(types[260:]) == {1}
    scores = np.asarray(meta["tokenizer.ggml.scores"])
    assert scores.shape == (tok.vocab_size,) and (np.diff(scores[260:]) <= 0).all()
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("padding", "unknown", "bos", "eos")] \
        == [0, 1, 2, 3]
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.add_bos_token"] is True
    # Spark's GGUF reader reads byte-level BPE vocabularies only, and says so.
    with pytest.raises(TokenizerError, match="'llama'"):
        spark_model.load(gguf)

    with pytest.warns(UserWarning, match="U\\+2581"):
        hf = export(path, "hf", tmp_path / "hf")
    assert (hf / "tokenizer.model").read_bytes() == tok.serialized()
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert (tc["tokenizer_class"], tc["add_bos_token"], tc["legacy"], tc["add_prefix_space"]) \
        == ("LlamaTokenizer", True, False, False)
    m = spark_model.load(hf, capacity=64)
    np.testing.assert_allclose(np.asarray(m.logits(np.asarray([ids]))[0]), ours, atol=1e-5)
    _same_tokenizer(m.tokenizer, tok, SP_TRICKY)


def test_float16_export_is_close(bpe_ckpt, tmp_path):
    path, cfg, params, tok = bpe_ckpt
    ids = tok.encode(TEXT, bos=True)
    ours = _logits(cfg, params, tok, ids)
    scale = np.abs(ours).max()
    f32_size = export(path, "gguf", tmp_path / "f32.gguf").stat().st_size
    for to, out in (("gguf", tmp_path / "f16.gguf"), ("hf", tmp_path / "f16")):
        m = spark_model.load(export(path, to, out, dtype="float16"), capacity=64)
        got = np.asarray(m.logits(np.asarray([ids]))[0])
        # float16 keeps 11 significant bits: logits within 1% of their range.
        assert np.abs(got - ours).max() < 1e-2 * scale
        assert not np.array_equal(got, ours)  # really rounded
    assert (tmp_path / "f16.gguf").stat().st_size < 0.6 * f32_size


def _spark(argv, monkeypatch) -> int:
    """`spark ARGV`, with the export command present even before a reinstall."""
    found = cli.commands()
    monkeypatch.setattr(cli, "commands", lambda: {**found, "export": commands.export})
    return cli.main(argv)


def _digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


@pytest.mark.parametrize("to,name", [("gguf", "m.gguf"), ("hf", "hf")])
def test_existing_path_is_refused_or_replaced_whole(bpe_ckpt, tmp_path, monkeypatch, capsys,
                                                   to, name):
    path = bpe_ckpt[0]
    out = tmp_path / name
    assert _spark(["export", str(path), "--to", to, "--out", str(out)], monkeypatch) == 0
    assert "exported" in capsys.readouterr().out
    before = _digest(out)
    assert _spark(["export", str(path), "--to", to, "--out", str(out), "--dtype", "float16"],
                  monkeypatch) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert _digest(out) == before

    # A write that fails half-way leaves the old export exactly as it was, and no debris.
    import gguf

    import spark_model.formats.tokenizer_export as te

    def boom(*a, **k):
        raise OSError("disk full")

    if to == "gguf":  # after the header and metadata are on disk
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    else:  # after model.safetensors and config.json are on disk
        monkeypatch.setattr(te, "write_hf_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        export(path, to, out, dtype="float16", overwrite=True)
    monkeypatch.undo()
    assert _digest(out) == before and sorted(tmp_path.iterdir()) == [out]

    assert _spark(["export", str(path), "--to", to, "--out", str(out), "--dtype", "float16",
                   "--overwrite"], monkeypatch) == 0
    assert _digest(out) != before and sorted(tmp_path.iterdir()) == [out]
    assert spark_model.load(out, capacity=64).config == bpe_ckpt[1]


def test_what_a_format_cannot_hold_is_refused(bpe_ckpt, tmp_path):
    path, cfg, params, tok = bpe_ckpt
    model = checkpoint.model_from_flat(cfg, params)
    # A SentencePiece-style (Metaspace) BPE tokenizer has no GGUF form.
    lib = metaspace_lib("normalizer")
    meta_tok = BPETokenizer.from_hf_dir(hf_dir(tmp_path / "tok", lib, {"eos_token": "</s>"}),
                                        vocab_size=cfg.vocab_size)
    sm = spark_model.SparkModel(model, meta_tok, capacity=64)
    with pytest.raises(FormatError, match="no GGUF form"):
        export(sm, "gguf", tmp_path / "x.gguf")
    # q/k/v biases make the file qwen2, whose llama.cpp graph has no Llama 3.1 scaling.
    bias_cfg = config(vocab_size=cfg.vocab_size, attn_bias=True, rope_scaling=RopeScaling())
    biased = spark_model.SparkModel(
        checkpoint.model_from_flat(bias_cfg, random_params(bias_cfg, seed=1)), tok, capacity=64)
    with pytest.raises(FormatError, match="llama3 rope scaling"):
        export(biased, "gguf", tmp_path / "x.gguf")
    # Llama 3.1 scaling whose divisors could not be read back (too few in the band).
    short = config(vocab_size=cfg.vocab_size, head_dim=8, rope_scaling=RopeScaling())
    small = spark_model.SparkModel(
        checkpoint.model_from_flat(short, random_params(short, seed=1)), tok, capacity=64)
    with pytest.raises(FormatError, match="cannot be written to GGUF"):
        export(small, "gguf", tmp_path / "x.gguf")
    with pytest.raises(FormatError, match="export format"):
        export(path, "onnx", tmp_path / "x")
    with pytest.raises(FormatError, match="dtype"):
        export(path, "gguf", tmp_path / "x.gguf", dtype="bfloat16")
    with pytest.raises(FormatError, match="does not exist"):
        export(path, "gguf", tmp_path / "no" / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # nothing was written


def test_the_command_is_registered():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    entry = pyproject["project"]["entry-points"]["spark.commands"]["export"]
    assert entry == "spark_model.commands:export"
    assert isinstance(commands.export, cli.Command)
