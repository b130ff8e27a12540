"""Fill-in-the-middle in training: the FIM control pieces of trained and extended
SentencePiece tokenizers, the warm start that grows spark-tiny's vocabulary
(--add-fim-tokens), the FIM transform of the token cache (train/fim_transform.py) against
the inference prompt of spark_model/fim.py, and the bad inputs of --fim-rate."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import fim
from spark_model.tokenizer import (FIM_PIECES, Tokenizer, TokenizerError, add_control_pieces,
                                   stdlib_python_files, train_tokenizer)
from train import cli, data, fim_transform
from train.config import SettingsError, TrainConfig, validate
from train.corpus import Document

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "checkpoints" / "spark-tiny"
SPELLED = "x = '<fim_prefix>' + \"<fim_suffix><fim_middle>\"  # <fim_pad>\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """spark-tiny as it was before it had fill-in-the-middle tokens: the shipped model
    without its three appended pieces and their embedding rows (a checkpoint to grow)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    import spark_model
    from spark_model.checkpoint import flat_params, model_from_flat, save

    shipped = spark_model.load(str(TINY))
    f = shipped.tokenizer.fim
    v = shipped.config.vocab_size - 3
    assert (f.prefix, f.suffix, f.middle) == (v, v + 1, v + 2)  # appended last, in order
    proto = pb.ModelProto()
    proto.ParseFromString(shipped.tokenizer.serialized())
    del proto.pieces[v:]
    flat = {k: np.asarray(a) for k, a in flat_params(shipped.model).items()}
    flat["embed"] = flat["embed"][:v]
    cfg = dataclasses.replace(shipped.config, vocab_size=v)
    dest = tmp_path_factory.mktemp("base") / "tiny-without-fim"
    save(dest, model_from_flat(cfg, flat), Tokenizer.from_bytes(proto.SerializeToString()))
    return dest


@pytest.fixture(scope="module")
def old_tok(base) -> Tokenizer:
    return Tokenizer.load(base / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(old_tok) -> Tokenizer:
    return add_control_pieces(old_tok)


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    out = []
    for path in stdlib_python_files()[::60][:40]:
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(Document(path.name, text, hashlib.sha256(text.encode()).hexdigest()))
    return out


def _split(ids: list[int], f: fim.FimTokens) -> tuple[str, dict[str, str]]:
    """The order and the decoded prefix/suffix/middle of a transformed document, found by
    the marker positions (an independent reading of the layout)."""
    tok_ids = ids[1:-1]
    where = {name: tok_ids.index(i) for name, i in
             (("prefix", f.prefix), ("suffix", f.suffix), ("middle", f.middle))}
    order = "psm" if where["prefix"] < where["suffix"] else "spm"
    bounds = sorted(where.items(), key=lambda kv: kv[1]) + [("end", len(tok_ids))]
    return order, {name: tok_ids[at + 1:bounds[k + 1][1]]
                   for k, (name, at) in enumerate(bounds[:-1])}


# ---- tokenizers ----------------------------------------------------------------------

def test_trained_tokenizer_has_fim_control_pieces_never_made_from_text():
    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in stdlib_python_files()[::80]]
    t = train_tokenizer(texts, 400, fim_tokens=True)
    assert t.fim == fim.FimTokens(4, 5, 6)
    assert [t.id_to_piece(i) for i in (4, 5, 6)] == list(FIM_PIECES)
    ids = t.encode(SPELLED)
    assert not {4, 5, 6} & set(ids) and t.decode(ids) == SPELLED
    assert t.decode([4, 5, 6]) == ""
    assert train_tokenizer(texts, 400).fim is None  # the library default is unchanged


def test_extended_tokenizer_keeps_every_id_and_encoding(old_tok, tok, docs):
    v = old_tok.vocab_size
    assert tok.vocab_size == v + 3
    assert [tok.id_to_piece(i) for i in range(v)] == [old_tok.id_to_piece(i) for i in range(v)]
    assert tok.piece_table()[:v] == old_tok.piece_table()
    assert [tok.id_to_piece(i) for i in range(v, v + 3)] == list(FIM_PIECES)
    assert tok.fim == fim.FimTokens(v, v + 1, v + 2)
    texts = [d.text for d in docs] + [SPELLED]
    assert tok.encode_batch(texts, bos=True, eos=True) == \
        old_tok.encode_batch(texts, bos=True, eos=True)
    assert not set(range(v, v + 3)) & set(tok.encode(SPELLED))
    assert tok.decode(list(range(v, v + 3))) == ""
    assert Tokenizer.from_bytes(tok.serialized()).fim == tok.fim  # survives a save
    with pytest.raises(TokenizerError, match="already has the piece"):
        add_control_pieces(tok)


# ---- the transform -------------------------------------------------------------------

@pytest.mark.parametrize("order", ["psm", "spm"])
def test_training_layout_is_the_inference_prompt_then_the_middle(tok, order):
    class Ordered:  # the tokenizer, with its markers in `order` (what prompt_ids reads)
        def __init__(self, inner):
            self._inner = inner
            self.fim = fim.FimTokens(inner.fim.prefix, inner.fim.suffix, inner.fim.middle,
                                     order=order)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    prefix, middle, suffix = "def f(a, b):\n    ret", "urn a + b\n\n", "\nprint(f(1, 2))\n"
    got = fim_transform.fim_document_ids(tok, tok.fim, prefix, middle, suffix, order)
    want = fim.prompt_ids(Ordered(tok), prefix, suffix, middle) + [tok.eos_id]
    assert got == want
    assert got[0] == tok.bos_id and got[-1] == tok.eos_id


def test_transform_rearranges_documents_losslessly_in_both_orders(tok, docs):
    out = fim_transform.documents_fim_ids(tok, docs, 1.0, seed=3)
    orders = set()
    for d, ids in zip(docs, out):
        order, parts = _split(ids, tok.fim)
        orders.add(order)
        text = {k: tok.decode(v) for k, v in parts.items()}
        assert text["prefix"] + text["middle"] + text["suffix"] == d.text
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert sum(i in (tok.fim.prefix, tok.fim.suffix, tok.fim.middle) for i in ids) == 3
    assert orders == {"psm", "spm"}


def test_transformed_fraction_and_order_share_follow_the_rate():
    n, rate = 4000, 0.3
    plans = [fim_transform.plan("abcdefghij" * 3, f"pkg/mod{k}.py", rate, 0) for k in range(n)]
    done = [p for p in plans if p is not None]
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(len(done) - n * rate) < 5 * sd
    spm = sum(p[0] == "spm" for p in done)
    assert abs(spm - len(done) * fim_transform.SPM_SHARE) < 5 * math.sqrt(len(done) / 4)
    assert all(0 <= p[1] <= p[2] <= 30 for p in done)
    assert len({(p[1], p[2]) for p in done}) > 100  # the cuts vary
    assert fim_transform.count_transformed(
        [Document(f"pkg/mod{k}.py", "abcdefghij" * 3, "") for k in range(n)], rate, 0) \
        == len(done)


def test_line_cuts_take_whole_lines_and_leave_character_cuts_alone(tok, docs):
    text = "".join(f"    line_{k} = {k}\n" for k in range(40)) + "tail"
    names = [f"pkg/mod{k}.py" for k in range(600)]
    for name in names:  # lines=0 is the rule of runs before the option, cut for cut
        assert fim_transform.plan(text, name, 0.5, 3, 0.0) == fim_transform.plan(
            text, name, 0.5, 3)
    lined = [fim_transform.plan(text, n, 1.0, 3, 1.0) for n in names]
    spans = set()
    for order, i, j in lined:
        middle = text[i:j]
        assert i == 0 or text[i - 1] == "\n"  # starts at a line start
        assert j == len(text) or text[j - 1] == "\n"  # ends after a newline (or at the end)
        n_lines = middle.count("\n") + (not middle.endswith("\n"))
        assert 1 <= n_lines <= fim_transform.MAX_MIDDLE_LINES
        spans.add(n_lines)
    assert spans == set(range(1, fim_transform.MAX_MIDDLE_LINES + 1))
    half = [fim_transform.plan(text, n, 1.0, 3, 0.5) for n in names]
    at_lines = sum(p == q for p, q in zip(half, lined))
    assert abs(at_lines - 300) < 5 * math.sqrt(150)  # the share follows `lines`
    out = fim_transform.documents_fim_ids(tok, docs, 1.0, seed=3, lines=1.0)
    for d, ids in zip(docs, out):  # lossless on real files too
        text_parts = {k: tok.decode(v) for k, v in _split(ids, tok.fim)[1].items()}
        assert text_parts["prefix"] + text_parts["middle"] + text_parts["suffix"] == d.text
        assert text_parts["prefix"] == "" or text_parts["prefix"].endswith("\n")
    assert data.token_cache_key(docs, docs[:2], tok.serialized(), 64, 0.5, 0, 0.5) != \
        data.token_cache_key(docs, docs[:2], tok.serialized(), 64, 0.5, 0)


def test_transform_is_deterministic_per_document(tok, docs):
    a = fim_transform.documents_fim_ids(tok, docs, 0.5, seed=1)
    b = fim_transform.documents_fim_ids(tok, docs[::-1], 0.5, seed=1)[::-1]
    assert a == b  # the same per document, whatever the others and their order
    plain = tok.encode_batch([d.text for d in docs], bos=True, eos=True)
    changed = [x != p for x, p in zip(a, plain)]
    assert 0 < sum(changed) < len(docs)  # some transformed, the others plain
    c = fim_transform.documents_fim_ids(tok, docs, 0.5, seed=2)
    assert c != a


def test_rate_zero_is_the_old_stream_and_key(tok, docs):
    ref = np.concatenate([np.asarray(tok.encode(d.text, bos=True, eos=True), np.uint16)
                          for d in docs])
    stream, _ = data._encode(tok, docs, np.uint16, packed=True, fim_rate=0.0, fim_seed=5)
    assert stream.dtype == ref.dtype and np.array_equal(stream, ref)
    key = data.token_cache_key(docs, docs[:2], tok.serialized(), 64)
    assert data.token_cache_key(docs, docs[:2], tok.serialized(), 64, 0.0, 5) == key
    keys = {data.token_cache_key(docs, docs[:2], tok.serialized(), 64, r, s)
            for r, s in ((0.5, 0), (0.5, 1), (0.25, 0))}
    assert len(keys) == 3 and key not in keys
    fimmed, off = data._encode(tok, docs, np.uint16, packed=True, fim_rate=0.5, fim_seed=5)
    for k, d in enumerate(docs):  # plain documents unchanged, the others rearranged
        ids = [int(i) for i in fimmed[off[k]:off[k + 1]]]
        if fim_transform.plan(d.text, d.name, 0.5, 5) is None:
            assert ids == tok.encode(d.text, bos=True, eos=True)
        else:
            parts = {n: tok.decode(v) for n, v in _split(ids, tok.fim)[1].items()}
            assert parts["prefix"] + parts["middle"] + parts["suffix"] == d.text


def test_validation_stays_plain_in_the_cache(tok, docs, tmp_path):
    td, _ = data.build_token_cache(docs[:20], docs[20:], tok, 64, tmp_path,
                                   fim_rate=1.0, fim_seed=0)
    assert np.array_equal(np.asarray(td.val), np.concatenate(
        [np.asarray(tok.encode(d.text, bos=True, eos=True)) for d in docs[20:]]))
    ids = np.asarray(td.train)
    assert np.sum(ids == tok.fim.middle) == 20


# ---- the warm start ------------------------------------------------------------------

def test_grown_model_keeps_the_old_logits(base, old_tok, docs):
    from spark_model.checkpoint import model_from_flat
    from train.init import add_fim_tokens, load_init

    start = load_init(str(base))
    grown = add_fim_tokens(start)
    v = start.cfg.vocab_size
    assert grown.cfg.vocab_size == v + 3 == grown.tokenizer.vocab_size
    assert grown.tokenizer.fim == fim.FimTokens(v, v + 1, v + 2)
    np.testing.assert_array_equal(grown.params["embed"][:v], start.params["embed"])
    np.testing.assert_allclose(grown.params["embed"][v:],
                               np.repeat(start.params["embed"].mean(0)[None], 3, 0), atol=1e-7)
    x = jnp.asarray([old_tok.encode(docs[0].text, bos=True)[:96]], jnp.int32)
    old = np.asarray(model_from_flat(start.cfg, start.params)(x))
    new = np.asarray(model_from_flat(grown.cfg, grown.params)(x))
    assert new.shape == old.shape[:-1] + (v + 3,)
    np.testing.assert_allclose(new[..., :v], old, rtol=1e-5, atol=1e-5)
    with pytest.raises(SettingsError, match="already has fill-in-the-middle tokens"):
        add_fim_tokens(grown)


# ---- settings and bad inputs ---------------------------------------------------------

def test_settings_before_fim_resume_with_rate_zero():
    stored = TrainConfig(init="/m").to_json_dict()
    del stored["fim_rate"], stored["add_fim_tokens"]
    tc = TrainConfig.from_json_dict(stored)
    assert tc.fim_rate == 0.0 and tc.add_fim_tokens is False


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf")])
def test_fim_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(SettingsError, match=r"--fim-rate must be in \[0, 1\]"):
        validate(TrainConfig(fim_rate=rate))
    with pytest.raises(SettingsError, match=r"--fim-lines must be in \[0, 1\]"):
        validate(TrainConfig(fim_rate=0.5, fim_lines=rate))


def test_fim_lines_needs_a_fim_rate():
    with pytest.raises(SettingsError, match="give --fim-rate above 0"):
        validate(TrainConfig(fim_lines=0.5))
    validate(TrainConfig(fim_rate=0.5, fim_lines=0.5))


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spark train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def test_cli_bad_fim_inputs(base, tmp_path, capsys):
    out = ["--out", tmp_path / "run", "--no-progress", "--cache-dir", tmp_path / "cache"]
    code, err = _cli(capsys, *out, "--fim-rate", "nan")
    assert code == 2 and "--fim-rate must be in [0, 1], got nan" in err
    code, err = _cli(capsys, *out, "--add-fim-tokens")
    assert code == 2 and "--add-fim-tokens extends an existing model's vocabulary" in err
    code, err = _cli(capsys, *out, "--init", base, "--add-fim-tokens", "--lora", "4")
    assert code == 2 and "which --lora adapters do not train" in err
    assert not (tmp_path / "run").exists()


def test_cli_fim_rate_needs_fim_tokens(base, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f():\n    return 1\n" * 50)
    code, err = _cli(capsys, "--out", tmp_path / "run", "--no-progress", "--cache-dir",
                     tmp_path / "cache", "--init", base, "--data", src, "--fim-rate", "0.5")
    assert code == 2 and "the tokenizer has no fill-in-the-middle tokens" in err


@pytest.mark.slow
def test_warm_start_with_fim_tokens_exports_and_resumes(base, tmp_path, capsys):
    """spark train --init spark-tiny --add-fim-tokens: the exported model has the grown
    vocabulary and infills; the run resumes from its own saved tokenizer; a model that has
    the tokens already is refused."""
    import json

    import spark_model
    from train import corpus

    src = tmp_path / "src"
    src.mkdir()
    std = corpus.stdlib_root()
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "glob.py"):
        (src / name).write_text((std / name).read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    common = ["--no-progress", "--cache-dir", tmp_path / "cache", "--line-samples", "0"]
    assert cli.main([str(a) for a in ["--init", base, "--add-fim-tokens", "--data", src,
                                      "--val-permille", "300", "--out", run, "--steps", "2",
                                      "--seq-len", "64", "--batch-size", "2", *common]]) == 0
    err = capsys.readouterr().err
    assert "fill-in-the-middle:" in err and "ids 8192..8194" in err
    settings = json.loads((run / "training" / "run.json").read_text())["settings"]
    assert settings["fim_rate"] == cli.FIM_RATE_WITH_NEW_TOKENS and settings["add_fim_tokens"]
    assert cli.main([str(a) for a in ["--out", run, "--resume", "--steps", "3", *common]]) == 0
    capsys.readouterr()
    m = spark_model.load(str(run))
    assert m.config.vocab_size == 8195 and m.tokenizer.fim == fim.FimTokens(8192, 8193, 8194)
    assert isinstance(m.infill("def f(x):\n    return ", "\n", max_new_tokens=4), str)
    code, err = _cli(capsys, "--init", run, "--add-fim-tokens", "--data", src,
                     "--out", tmp_path / "again", *common)
    assert code == 2 and "already has fill-in-the-middle tokens" in err
