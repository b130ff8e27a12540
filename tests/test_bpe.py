"""BPETokenizer (spark_model/bpe.py) against a plain-Python BPE (tests/bpe_reference.py).

A small byte-level BPE is trained here with the `tokenizers` trainer on standard-library
code, then handed to BPETokenizer both as GGUF metadata and as a Hugging Face directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

import spark_model
from spark_model import ModelConfig, checkpoint, init_model
from spark_model.bpe import BPETokenizer, TokenizerError, byte_to_unicode
from spark_model.tokenizer import stdlib_python_files
from spark_model.tokenizers_io import load_tokenizer

regex = pytest.importorskip("regex")
from bpe_reference import SPLITS, ReferenceBPE, gpt2_bytes_map, split  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}")
TRICKY = [
    "", " ", "  ", "\t", "\n", "\r\n", "a\r\nb\r\n", "x  =  1\n\n\n    y   ", "\t\tindent\n\t",
    "héllo wörld", "日本語のテキスト", "emoji 😀👍🏽🇺🇸 ❤️", "12345678901234567890",
    "3.14159 1,000,000 x2y", "it's they'll I'M we'VE", "\u00a0nbsp\u200dzwj\ufeff",
    "e\u0301 combining", "a\u2581marker ▁▁", "form\x0cfeed\x00nul\x7f", " leading", "trailing ",
    "<|im_end|> <|endoftext|>x", "<|im_start|", "def f(a, *b, **c):\n    return {'k': [1, 2]}\n",
]


def _files(step: int, offset: int) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace")
            for f in stdlib_python_files()[offset::step]]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A 700-id byte-level BPE (SmolLM2's split: single digits, then GPT-2's regex)."""
    lib = Tokenizer(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    lib.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lib.train_from_iterator(_files(80, 0), trainer)
    return lib


def gguf_meta(lib: Tokenizer, pre: str = "smollm", **extra) -> dict:
    """The tokenizer keys a GGUF converter would write for `lib`."""
    model = json.loads(lib.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE}
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def reference(meta: dict, pre: str | None = None) -> ReferenceBPE:
    tokens = meta["tokenizer.ggml.tokens"]
    specials = {t: i for i, t in enumerate(tokens) if meta["tokenizer.ggml.token_type"][i] == 3}
    return ReferenceBPE(tokens, meta["tokenizer.ggml.merges"], pre or meta["tokenizer.ggml.pre"],
                        specials)


def hf_dir(root: Path, lib: Tokenizer, tokenizer_config: dict | None = None, **files) -> Path:
    """A Hugging Face directory: tokenizer.json, tokenizer_config.json and `files` (JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(lib.to_str())
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def from_gguf(trained) -> BPETokenizer:
    return BPETokenizer.from_gguf_metadata(gguf_meta(trained))


@pytest.fixture(scope="module")
def from_hf(trained, tmp_path_factory) -> BPETokenizer:
    config = {"add_bos_token": False, "bos_token": "<|im_start|>",
              "eos_token": {"content": "<|im_end|>"}, "chat_template": TEMPLATE}
    return BPETokenizer.from_hf_dir(hf_dir(tmp_path_factory.mktemp("hf"), trained, config))


# ---- agreement ---------------------------------------------------------------------------

def test_gguf_and_tokenizer_json_give_the_reference_ids(trained, from_gguf, from_hf):
    ref = reference(gguf_meta(trained))
    texts = TRICKY + _files(97, 5)[:6]  # files the tokenizer was not trained on
    for special in (False, True):
        want = [ref.encode(t, special=special) for t in texts]
        assert [from_gguf.encode(t, special=special) for t in texts] == want
        assert [from_hf.encode(t, special=special) for t in texts] == want
        assert from_gguf.encode_batch(texts, special=special) == want
        assert from_hf.encode_batch(texts, special=special) == want


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_other_pre_tokenizers_follow_the_reference(trained, pre):
    meta = gguf_meta(trained, pre=pre)
    tok = BPETokenizer.from_gguf_metadata(meta)
    ref = reference(meta)
    for text in TRICKY + _files(97, 7)[:3]:
        assert tok.encode(text) == ref.encode(text), text
    if pre == "llama-bpe":  # Llama 3 matches whole vocabulary words before merging
        word = next(t for t in meta["tokenizer.ggml.tokens"][300:] if t.isalpha())
        assert tok.encode(word) == [meta["tokenizer.ggml.tokens"].index(word)]


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_pre_tokenizers_split_like_the_reference(pre):
    chars = byte_to_unicode()
    tok = BPETokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [chars[b] for b in range(256)],
        "tokenizer.ggml.token_type": [1] * 256, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 0})
    as_bytes = gpt2_bytes_map()
    extra = "x = 日本語 한국어 ࠀ 1234567 a1b22 $+<=>^~| ¡¿ \r\r\n\n ' 's 'S"
    for text in [*TRICKY, extra, *_files(97, 9)[:2]]:
        got = [p for p, _ in tok._lib.pre_tokenizer.pre_tokenize_str(text)]
        want = ["".join(as_bytes[b] for b in p.encode()) for p in split(text, SPLITS[pre][0])]
        assert got == want, (pre, text)


def test_ignore_merges_takes_whole_words():
    """llama-bpe: a vocabulary word no merge sequence builds is still one token."""
    chars = byte_to_unicode()
    tokens = [chars[b] for b in range(256)] + ["ab", "abc", "bc"]
    merges = ["a b", "b c"]  # "abc" cannot be reached: "a b" wins, then "ab c" is no merge
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": 0}
    plain = BPETokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt2"})
    llama = BPETokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    assert plain.encode("abc") == [256, ord("c")]
    assert llama.encode("abc") == [257]
    assert reference(meta, "llama-bpe").encode("abc") == [257]


# ---- exact text ------------------------------------------------------------------------

def test_decode_gives_back_every_byte(from_gguf, from_hf):
    for tok in (from_gguf, from_hf):
        assert tok.prefix_space is False
        for text in TRICKY:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert tok.decode_bytes(ids) == text.encode("utf-8")
            stream = tok.stream_decoder()
            assert "".join(stream.feed(i) for i in ids) + stream.flush() == text
        assert tok.decode(tok.encode_batch(TRICKY)[10]) == TRICKY[10]


def test_the_byte_table_inverts_gpt2s_map(from_gguf):
    chars = gpt2_bytes_map()
    for b in (0, 9, 10, 32, 65, 127, 160, 173, 255):
        assert from_gguf.decode_bytes([from_gguf.token_to_id(chars[b])]) == bytes([b])


def test_special_text_is_text_unless_asked(from_gguf):
    tok = from_gguf
    text = "a <|im_end|> b<|endoftext|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_ids)
    assert tok.decode(plain) == text
    matched = tok.encode(text, special=True)
    assert tok.eos_id in matched and 0 in matched
    assert tok.decode(matched) == text  # special ids read back as their text
    assert tok.id_to_piece(2) == "<|im_end|>"


def test_ids_flags_and_template(from_gguf, from_hf):
    for tok in (from_gguf, from_hf):
        assert tok.bos_id == 1 and tok.add_bos is False
        assert tok.encode("x", bos=True) == tok.encode("x")  # the model adds no BOS
        assert tok.encode("x", eos=True)[-1] == 2
        assert tok.eos_id == 2 and tok.end_ids == (2, 0)  # <|im_end|>, then <|endoftext|>
        assert tok.pad_id == 2
        assert tok.chat_template == TEMPLATE
        assert tok.vocab_size == 700 and tok.special_ids == (0, 1, 2)


def test_gguf_end_ids_and_bos_defaults(trained):
    tok = BPETokenizer.from_gguf_metadata(gguf_meta(
        trained, pre="llama-bpe", **{"tokenizer.ggml.add_bos_token": None,
                                     "tokenizer.ggml.padding_token_id": None,
                                     "tokenizer.ggml.eot_token_id": 1}))
    assert tok.add_bos and tok.encode("x", bos=True)[0] == 1  # llama-bpe adds BOS by default
    assert tok.end_ids == (2, 1, 0) and tok.pad_id == 2
    no_bos = BPETokenizer.from_gguf_metadata(gguf_meta(
        trained, **{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True}))
    assert no_bos.bos_id is None and not no_bos.add_bos and no_bos.encode("", bos=True) == []


def test_hf_fallbacks_and_generation_config(trained, tmp_path):
    root = hf_dir(tmp_path / "m", trained, None, config={"bos_token_id": 1, "eos_token_id": 2},
                  generation_config={"eos_token_id": [2, 1]})
    tok = BPETokenizer.from_hf_dir(root, vocab_size=704)
    assert tok.bos_id == 1 and tok.end_ids == (2, 1, 0) and tok.add_bos is False
    assert tok.vocab_size == 704 and tok.decode([700, 703]) == ""
    (root / "chat_template.jinja").write_text(TEMPLATE)
    assert BPETokenizer.from_hf_dir(root).chat_template == TEMPLATE
    # No add_bos_token: BOS is added when tokenizer.json's post-processor starts with it.
    lib = Tokenizer.from_str(trained.to_str())
    lib.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    with_bos = BPETokenizer.from_hf_dir(hf_dir(tmp_path / "b", lib, config))
    assert with_bos.add_bos and with_bos.encode("x", bos=True) == [1, *with_bos.encode("x")]
    assert not BPETokenizer.from_hf_dir(hf_dir(tmp_path / "c", trained, config)).add_bos


def test_user_defined_tokens_match_in_plain_text(trained, tmp_path):
    """GGUF USER_DEFINED and Hugging Face non-special added tokens match in any text."""
    meta = gguf_meta(trained)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "<think>"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 4]
    tok = BPETokenizer.from_gguf_metadata(meta)
    ids = tok.encode("a<think>b")
    assert 700 in ids and tok.decode(ids) == "a<think>b" and 700 not in tok.special_ids
    lib = Tokenizer.from_str(trained.to_str())
    lib.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    hf = BPETokenizer.from_hf_dir(hf_dir(tmp_path / "u", lib, {"eos_token": "<|im_end|>"}))
    assert hf.encode("a<think>b") == ids


def test_unencodable_bytes_are_refused():
    chars = byte_to_unicode()
    tokens = [chars[b] for b in range(256) if b != 4]  # trained without byte 0x04
    tok = BPETokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 255,
        "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})
    assert tok.decode(tok.encode("ok\x05")) == "ok\x05"
    with pytest.raises(TokenizerError, match="U\\+0004 at offset 2"):
        tok.encode("ok\x04")
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800")


# ---- SentencePiece-style tokenizer.json ------------------------------------------------

def metaspace_lib(style: str) -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁abcdefghijklmnopqrstuvwxyz=():":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "d"), ("e", "f"), ("▁d", "ef"), ("▁", "▁"), ("▁▁", "▁▁")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    lib = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    if style == "normalizer":  # Llama 2's current tokenizer.json
        lib.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        lib.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:  # older files: a Metaspace pre-tokenizer
        lib.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
        lib.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="first"),
                                         decoders.ByteFallback()])
    lib.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    return lib


@pytest.mark.parametrize("style", ["normalizer", "pre_tokenizer"])
def test_sentencepiece_style_keeps_every_byte(style, tmp_path):
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    tok = BPETokenizer.from_hf_dir(hf_dir(tmp_path, metaspace_lib(style), config))
    assert tok.kind == "metaspace" and tok.prefix_space is True  # SentencePiece's dummy space
    assert tok.encode("def", bos=True) == [1, tok.token_to_id("▁def")]
    assert tok.end_ids == (2,) and tok.add_bos
    for text in TRICKY:
        got = tok.decode(tok.encode(text))
        assert got == (" " + text if text else ""), text
    assert tok.decode(tok.encode("x▁y▁")) == " x▁y▁"  # a literal "▁" is not a space
    assert tok.decode(tok.encode("▁")) == " ▁"
    assert tok.decode(tok.encode_batch(["a▁b", "c"])[0]) == " a▁b"
    tok.save_to_dir(tmp_path / "saved")
    again = BPETokenizer.load_dir(tmp_path / "saved")
    assert [again.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]


# ---- checkpoints -----------------------------------------------------------------------

def test_checkpoint_round_trip(from_gguf, tmp_path):
    cfg = ModelConfig(vocab_size=from_gguf.vocab_size, d_model=16, n_layers=1, n_heads=2,
                      n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=64, rope_theta=10_000.0,
                      rope_scaling=None)
    path = checkpoint.save(tmp_path / "ck", init_model(cfg, seed=0), from_gguf)
    names = sorted(p.name for p in path.iterdir())
    assert "tokenizer.json" in names and "tokenizer_meta.json" in names
    assert "tokenizer.model" not in names
    m = spark_model.load(path, capacity=32)
    tok = m.tokenizer
    assert isinstance(tok, BPETokenizer) and isinstance(load_tokenizer(path), BPETokenizer)
    assert tok.meta() == from_gguf.meta()
    for special in (False, True):
        assert tok.encode_batch(TRICKY, special=special) == \
            from_gguf.encode_batch(TRICKY, special=special)
    assert [tok.decode_bytes([i]) for i in range(tok.vocab_size)] == \
        [from_gguf.decode_bytes([i]) for i in range(tok.vocab_size)]
    (path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="two tokenizers"):
        spark_model.load(path)
    (path / "tokenizer.model").unlink()
    (path / "tokenizer_meta.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing tokenizer.model or"):
        spark_model.load(path)


def test_damaged_meta_is_named(from_gguf, tmp_path):
    from_gguf.save_to_dir(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(TokenizerError, match="version 9"):
        BPETokenizer.load_dir(tmp_path)
    del meta["end_ids"]
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="end_ids"):
        BPETokenizer.load_dir(tmp_path)


# ---- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.pre": "falcon"}, "unsupported tokenizer.ggml.pre 'falcon'"),
    ({"tokenizer.ggml.model": "llama"}, "'llama' \\(a SentencePiece vocabulary\\)"),
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.tokens": None}, "missing tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": None}, "missing tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": None}, "missing tokenizer.ggml.model"),
    ({"tokenizer.ggml.pre": None}, "missing tokenizer.ggml.pre"),
    ({"tokenizer.ggml.token_type": None}, "missing tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokens must be a non-empty list"),
    ({"tokenizer.ggml.merges": "a b"}, "merges must be a list"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "one type per token"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id 1000000 is outside"),
    ({"tokenizer.ggml.bos_token_id": "1"}, "bos_token_id must be an integer"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token must be a bool"),
])
def test_bad_gguf_metadata_is_named(trained, change, message):
    meta = gguf_meta(trained)
    for k, v in change.items():
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_gguf_metadata(meta)


def test_bad_tokens_and_merges_are_named(trained):
    meta = gguf_meta(trained)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    cases = [
        ({"tokenizer.ggml.tokens": [*tokens[:-1], 7]}, "tokens\\[699\\] is int"),
        ({"tokenizer.ggml.tokens": [*tokens[:-1], tokens[5]]}, "tokens\\[699\\] .* repeats"),
        ({"tokenizer.ggml.merges": [*merges[:3], 5]}, "merges\\[3\\] is int"),
        ({"tokenizer.ggml.merges": [*merges[:3], "a b c"]}, "merges\\[3\\] 'a b c' is not two"),
        ({"tokenizer.ggml.merges": [*merges[:3], "Ġ zzzq"]}, "uses 'zzzq', which is not in"),
        ({"tokenizer.ggml.token_type": ["x"] * len(tokens)}, "token_type\\[0\\] must be"),
    ]
    for change, message in cases:
        with pytest.raises(TokenizerError, match=message):
            BPETokenizer.from_gguf_metadata({**meta, **change})
    with pytest.raises(TypeError, match="dict"):
        BPETokenizer.from_gguf_metadata([("tokenizer.ggml.model", "gpt2")])


def test_unsupported_tokenizer_json_is_refused_by_name(trained, tmp_path):
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match="'WordPiece' is not supported"):
        BPETokenizer.from_hf_dir(hf_dir(tmp_path / "wp", wordpiece))
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    with pytest.raises(TokenizerError, match="Unigram model without byte_fallback"):
        BPETokenizer.from_hf_dir(hf_dir(tmp_path / "ug", unigram))
    lowered = Tokenizer.from_str(trained.to_str())
    lowered.normalizer = normalizers.Lowercase()
    with pytest.raises(TokenizerError, match="does not reproduce text exactly"):
        BPETokenizer.from_hf_dir(hf_dir(tmp_path / "lc", lowered, {"eos_token": "<|im_end|>"}))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        BPETokenizer.from_hf_dir(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in"):
        BPETokenizer.from_hf_dir(hf_dir(tmp_path / "ne", trained, {"eos_token": "<nope>"}))


# ---- the real SmolLM2 vocabulary -----------------------------------------------------------

SMOLLM2_DEFAULT = "~/.cache/spark/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    path = Path(os.environ.get("SPARK_SMOLLM2_GGUF") or SMOLLM2_DEFAULT).expanduser()
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF not present "
                    "(set SPARK_SMOLLM2_GGUF or place it at " + SMOLLM2_DEFAULT + ")")
def test_smollm2_matches_the_reference_on_held_out_stdlib():
    gguf = pytest.importorskip("gguf")
    from train.corpus import validation_documents

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok = BPETokenizer.from_gguf_metadata(meta)
    assert (tok.vocab_size, tok.bos_id, tok.end_ids, tok.add_bos) == (49152, 1, (2, 0), False)
    assert "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", special=True)[0] == 1
    docs = validation_documents()
    assert len(docs) > 10
    texts = [d.text for d in docs]
    ref = reference(meta)
    ours = tok.encode_batch(texts)
    for doc, ids in zip(docs, ours):
        assert ids == ref.encode(doc.text), doc.name
        assert tok.decode(ids) == doc.text, doc.name
