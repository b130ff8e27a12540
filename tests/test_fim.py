"""Fill-in-the-middle (spark_model/fim.py, `generate(..., suffix=)`): the markers found from
vocabularies and GGUF keys, and the prompt checked id by id against one built by hand from
the vocabulary; generation against plain token-level generation of that hand-built prompt."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as LibTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from spark_model import fim
from spark_model.api import SparkModel
from spark_model.bpe import BPETokenizer, TokenizerError
from spark_model.tokenizer import Tokenizer, stdlib_python_files

from fim_models import random_model as _model, with_fim_pieces  # noqa: E402

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"


@pytest.fixture(scope="module")
def sp_fim(small_tokenizer) -> tuple[Tokenizer, int]:
    return with_fim_pieces(small_tokenizer)


def _cut(ids: list[int], ends) -> list[int]:
    """ids up to and including the first end id."""
    for k, t in enumerate(ids):
        if t in ends:
            return ids[:k + 1]
    return ids


def test_sentencepiece_markers_come_from_the_vocabulary(sp_fim, small_tokenizer):
    tok, base = sp_fim
    assert tok.fim == fim.FimTokens(base, base + 1, base + 2, stops=(base + 3,))
    assert small_tokenizer.fim is None


def test_the_prompt_is_the_hand_built_id_sequence(sp_fim):
    tok, base = sp_fim
    lm = SparkModel(_model(tok.vocab_size), tok, capacity=256)
    want = ([tok.bos_id, base] + tok.encode(PREFIX) + [base + 1] + tok.encode(SUFFIX)
            + [base + 2])
    assert lm.fim_prompt_ids(PREFIX, SUFFIX) == want
    # Marker text inside the user's code is not spliced in as a marker by our prompt code:
    # each text is encoded on its own, between the marker ids.
    assert lm.fim_prompt_ids("", "", "x = ") == [tok.bos_id, base, base + 1, base + 2] + \
        tok.encode("x = ")
    spm = fim.FimTokens(base, base + 1, base + 2, order="spm")
    tok.fim, saved = spm, tok.fim
    try:
        assert fim.prompt_ids(tok, PREFIX, SUFFIX) == (
            [tok.bos_id, base + 1] + tok.encode(SUFFIX) + [base] + tok.encode(PREFIX)
            + [base + 2])
    finally:
        tok.fim = saved


def test_generate_with_a_suffix_continues_the_hand_built_prompt(sp_fim):
    tok, base = sp_fim
    lm = SparkModel(_model(tok.vocab_size), tok, capacity=256)
    assert lm.supports_infill and lm.fim_end_ids() == (tok.eos_id, base + 3)
    prompts = [PREFIX, "import os\n", "x"]
    suffixes = [SUFFIX, "\nprint(os.sep)\n", ""]
    hand = [[tok.bos_id, base] + tok.encode(p) + [base + 1] + tok.encode(s) + [base + 2]
            for p, s in zip(prompts, suffixes)]
    ref = [_cut(r, {tok.eos_id, base + 3})
           for r in lm.generate_tokens(hand, 20, ignore_eos=True)]
    want = [tok.decode(r[:-1] if r[-1] in (tok.eos_id, base + 3) else r, errors="replace")
            for r in ref]
    assert lm.generate(prompts, 20, suffix=suffixes) == want
    assert lm.infill(prompts, suffixes, 20) == want
    assert lm.generate(prompts[0], 20, suffix=suffixes[0]) == want[0]
    assert "".join(lm.stream(prompts[0], 20, suffix=suffixes[0])) == want[0]


def test_a_model_without_markers_refuses_a_suffix(small_tokenizer, small_model):
    lm = SparkModel(small_model, small_tokenizer, capacity=128)
    assert not lm.supports_infill
    with pytest.raises(fim.NoFimTokens, match="no fill-in-the-middle tokens"):
        lm.generate("x", 4, suffix="y")
    with pytest.raises(fim.NoFimTokens):
        list(lm.stream("x", 4, suffix="y"))
    assert lm.generate("x", 4) == lm.generate(["x"], 4)[0]  # plain generation unchanged


def test_suffix_arguments_are_checked(sp_fim):
    tok, _ = sp_fim
    lm = SparkModel(_model(tok.vocab_size), tok, capacity=128)
    with pytest.raises(TypeError, match="one suffix string"):
        lm.generate(["a", "b"], 4, suffix="c")
    with pytest.raises(ValueError, match="2 prompts but 1 suffixes"):
        lm.generate(["a", "b"], 4, suffix=["c"])


# ---- byte-level BPE: GGUF keys and vocabulary spellings -----------------------------------

SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
            "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


@pytest.fixture(scope="module")
def lib() -> LibTokenizer:
    out = LibTokenizer(models.BPE())
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    out.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    out.train_from_iterator([f.read_text(encoding="utf-8", errors="replace")
                             for f in stdlib_python_files()[::200]], trainer)
    return out


def gguf_meta(lib: LibTokenizer, specials=SPECIALS, **extra) -> dict:
    vocab = json.loads(lib.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(lib.to_str())["model"]["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 0}
    meta.update(extra)
    return meta


def test_gguf_keys_name_the_markers_and_the_vocabulary_fills_the_rest(lib):
    ids = {t: lib.token_to_id(t) for t in SPECIALS}
    by_vocab = BPETokenizer.from_gguf_metadata(gguf_meta(lib))
    # The first convention found wins: StarCoder's spellings, with their end tokens.
    assert by_vocab.fim == fim.FimTokens(ids["<fim_prefix>"], ids["<fim_suffix>"],
                                         ids["<fim_middle>"],
                                         stops=(ids["<fim_pad>"], ids["<|endoftext|>"]))
    named = BPETokenizer.from_gguf_metadata(gguf_meta(
        lib, **{"tokenizer.ggml.fim_pre_token_id": ids["<|fim_prefix|>"],
                "tokenizer.ggml.fim_suf_token_id": ids["<|fim_suffix|>"],
                "tokenizer.ggml.fim_mid_token_id": ids["<|fim_middle|>"],
                "tokenizer.ggml.fim_pad_token_id": 300}))
    assert (named.fim.prefix, named.fim.suffix, named.fim.middle) == (
        ids["<|fim_prefix|>"], ids["<|fim_suffix|>"], ids["<|fim_middle|>"])
    assert named.fim.stops[0] == 300 and ids["<fim_pad>"] in named.fim.stops
    old = BPETokenizer.from_gguf_metadata(gguf_meta(
        lib, **{"tokenizer.ggml.prefix_token_id": 5, "tokenizer.ggml.suffix_token_id": 6,
                "tokenizer.ggml.middle_token_id": 7}))
    assert (old.fim.prefix, old.fim.suffix, old.fim.middle) == (5, 6, 7)
    none = BPETokenizer.from_gguf_metadata(gguf_meta(lib, specials=["<|endoftext|>"]) | {
        "tokenizer.ggml.tokens": [t if not t.startswith(("<fim", "<|fim")) else f"x{t}"
                                  for t in gguf_meta(lib)["tokenizer.ggml.tokens"]]})
    assert none.fim is None


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer.ggml.fim_pre_token_id": 1}, "only some of the fill-in-the-middle"),
    ({"tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.ggml.fim_suf_token_id": 2,
      "tokenizer.ggml.fim_mid_token_id": 10**6}, "fim_mid_token_id 1000000 is not a token"),
    ({"tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.ggml.fim_suf_token_id": 1,
      "tokenizer.ggml.fim_mid_token_id": 2}, "three different ids"),
])
def test_bad_gguf_fim_keys_are_named(lib, extra, message):
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_gguf_metadata(gguf_meta(lib, **extra))


def test_other_conventions_are_found_by_their_spellings():
    def lookup(names):
        table = {n: i for i, n in enumerate(names)}
        return table.get

    assert fim.detect(lookup(["a", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"])) == \
        fim.FimTokens(1, 3, 2, stops=(4, 6, 5), repo=5, file_sep=6)
    assert fim.detect(lookup(["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"])) == \
        fim.FimTokens(0, 1, 2, stops=(3,))
    assert fim.detect(lookup(["<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>",
                              "<\uff5cfim\u2581end\uff5c>"])) == fim.FimTokens(0, 1, 2)
    assert fim.detect(lookup(["<fim_prefix>", "<fim_suffix>"])) is None


def test_markers_are_saved_with_the_tokenizer_and_old_files_still_load(lib, tmp_path):
    tok = BPETokenizer.from_gguf_metadata(gguf_meta(
        lib, **{"tokenizer.ggml.fim_pre_token_id": lib.token_to_id("<|fim_prefix|>"),
                "tokenizer.ggml.fim_suf_token_id": lib.token_to_id("<|fim_suffix|>"),
                "tokenizer.ggml.fim_mid_token_id": lib.token_to_id("<|fim_middle|>")}))
    tok.save_to_dir(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "tokenizer_meta.json").read_text())
    assert meta["fim"]["prefix"] == lib.token_to_id("<|fim_prefix|>")
    assert BPETokenizer.load_dir(tmp_path / "new").fim == tok.fim
    # A file written before the field existed: the markers are found from the vocabulary.
    del meta["fim"]
    (tmp_path / "new" / "tokenizer_meta.json").write_text(json.dumps(meta))
    assert BPETokenizer.load_dir(tmp_path / "new").fim.prefix == lib.token_to_id("<fim_prefix>")
    for bad, message in [({"prefix": 1}, "lacks field 'suffix'"),
                         ({"prefix": 1, "suffix": 2, "middle": 3, "order": "x"}, "order"),
                         ({"prefix": 1, "suffix": 2, "middle": 99999}, "middle id 99999")]:
        (tmp_path / "new" / "tokenizer_meta.json").write_text(json.dumps({**meta, "fim": bad}))
        with pytest.raises(TokenizerError, match=message):
            BPETokenizer.load_dir(tmp_path / "new")


def test_an_infill_stops_at_the_vocabularys_infill_end_token(lib):
    """A GGUF file names an ordinary token as <fim_pad>; the infill ends right there."""
    keys = {"tokenizer.ggml.fim_pre_token_id": lib.token_to_id("<fim_prefix>"),
            "tokenizer.ggml.fim_suf_token_id": lib.token_to_id("<fim_suffix>"),
            "tokenizer.ggml.fim_mid_token_id": lib.token_to_id("<fim_middle>")}
    plain = BPETokenizer.from_gguf_metadata(gguf_meta(lib, specials=["<|endoftext|>"], **keys))
    weights = _model(plain.vocab_size, seed=1)
    lm = SparkModel(weights, plain, capacity=256)
    hand = ([keys["tokenizer.ggml.fim_pre_token_id"]] + plain.encode(PREFIX)
            + [keys["tokenizer.ggml.fim_suf_token_id"]] + plain.encode(SUFFIX)
            + [keys["tokenizer.ggml.fim_mid_token_id"]])
    assert lm.fim_prompt_ids(PREFIX, SUFFIX) == hand
    chain = lm.generate_tokens([hand], 24, ignore_eos=True)[0]
    # A token first generated at step k >= 2, with no end id before it (the model's, 0,
    # or the vocabulary's <fim_pad>, an infill end token too).
    ends = {0, lib.token_to_id("<fim_pad>")}
    k = next(k for k in range(2, 24)
             if chain[k] not in chain[:k] and not ends & set(chain[:k + 1]))
    stop = chain[k]
    tok = BPETokenizer.from_gguf_metadata(gguf_meta(
        lib, specials=["<|endoftext|>"], **keys, **{"tokenizer.ggml.fim_pad_token_id": stop}))
    lm = SparkModel(weights, tok, capacity=256)
    # The model's end id, the named pad, then the vocabulary's own <fim_pad>.
    assert lm.fim_end_ids() == (0, stop, lib.token_to_id("<fim_pad>"))
    assert stop not in lm.end_ids
    want = tok.decode(chain[:k], errors="replace")
    assert lm.generate(PREFIX, 24, suffix=SUFFIX) == want
    assert "".join(lm.stream(PREFIX, 24, suffix=SUFFIX)) == want


def test_an_exported_gguf_names_the_markers(lib, sp_fim):
    from spark_model.formats.tokenizer_export import gguf_tokenizer_meta

    tok = BPETokenizer.from_gguf_metadata(gguf_meta(lib))
    meta = gguf_tokenizer_meta(tok)
    assert (meta["tokenizer.ggml.fim_pre_token_id"], meta["tokenizer.ggml.fim_suf_token_id"],
            meta["tokenizer.ggml.fim_mid_token_id"]) == (
        lib.token_to_id("<fim_prefix>"), lib.token_to_id("<fim_suffix>"),
        lib.token_to_id("<fim_middle>"))
    assert BPETokenizer.from_gguf_metadata(meta).fim == tok.fim
    sp, base = sp_fim
    assert gguf_tokenizer_meta(sp)["tokenizer.ggml.fim_mid_token_id"] == base + 2
