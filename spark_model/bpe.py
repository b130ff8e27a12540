"""Tokenizers of imported models: byte-level BPE (GPT-2 style) and SentencePiece-style BPE.

The `tokenizers` library does the encoding. This module builds its tokenizer from a
GGUF file's metadata or a Hugging Face directory, adds what Spark's tokenizer interface
needs (BOS/end ids, chat template, special-token control) and decodes on its own:

* Exact decoding. Every id maps to its bytes through a table built once: a byte-level
  piece is turned back into bytes by inverting the GPT-2 byte-to-character map, a
  SentencePiece-style piece is its text with "▁" read as a space and "<0xAB>" read as
  that byte, an added or special token is its text. `decode_bytes` joins table entries,
  so streaming never splits or alters a character and nothing is stripped or cleaned.
* Special tokens only on request. Control tokens ("<|im_end|>", "<|endoftext|>") are
  produced only by `encode(..., special=True)`; in plain text their characters are text.
  Added tokens that are not special (GGUF USER_DEFINED, Hugging Face added tokens with
  special=false) match in any text, as in llama.cpp and Hugging Face.
* No silent loss. A vocabulary trained on a restricted alphabet (SmolLM2's lacks 21 of
  the 256 byte symbols, e.g. 0x04) cannot encode some characters; the library would drop
  them, `encode` refuses the text naming the character instead.
* Dummy prefix. Tokenizers that put a space before the text (SentencePiece's dummy
  prefix, ByteLevel add_prefix_space) keep doing so, as the model was trained that way;
  `prefix_space` says so, and then `decode(encode(x)) == " " + x` for non-empty x.

The id -> bytes rules live in `bpe_bytes` and the pre-tokenizers GGUF names in
`bpe_pretokenizers`; their public names (`byte_to_unicode`, `PRE_TOKENIZERS`,
`BYTE_LEVEL`, `METASPACE`) stay importable from here.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _LibTokenizer
from tokenizers import decoders, models

from spark_model.bpe_bytes import (  # noqa: F401 - byte_to_unicode re-exported
    BYTE_LEVEL, META, METASPACE, byte_to_unicode, id_tables, unencodable_bytes)
from spark_model.bpe_pretokenizers import (_PRE, PRE_TOKENIZERS, build_pre_tokenizer,
                                           gguf_pre_name)
from spark_model import fim as fim_tokens
from spark_model.tokenizer import ByteTableDecoding, TokenizerError
from spark_model.versioned_json import read_versioned_json

TOKENIZER_JSON = "tokenizer.json"  # the library's own JSON, as Hugging Face ships it
META_JSON = "tokenizer_meta.json"  # Spark's ids, flags and chat template
META_FORMAT = "spark-bpe-tokenizer"
META_VERSION = 1

# GGUF token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Special tokens that end a turn or a document in common vocabularies: each one present
# in the vocabulary as a special token also ends generation.
END_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>",
             "<|EOT|>", "<|end|>")

# Checked on construction: any tokenizer whose normalisation changes this text is refused.
_PROBE = "  X\u00a0=\t'\uff46\u00e9'  \r\n\n    y\u200d\U0001f600 0123456789 <|x|> \\ \u4e2d "


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TokenizerError(f"{what} must be an integer token id, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TokenizerError(f"{what} must be an integer token id, "
                             f"got {type(value).__name__}") from None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at "
            f"character offset {e.start} cannot be encoded as UTF-8") from None


def _dedup(ids: Iterable[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(i)
    return tuple(out)


class BPETokenizer(ByteTableDecoding):
    """A `tokenizers` BPE tokenizer with Spark's interface and exact byte decoding.

    Build one with `from_gguf_metadata`, `from_hf_dir` or `load_dir`; save it into a
    checkpoint with `save_to_dir`.
    """

    def __init__(self, tokenizer: _LibTokenizer, *, kind: str, bos_id: int | None,
                 end_ids: Sequence[int], pad_id: int | None, add_bos: bool,
                 chat_template: str | None, vocab_size: int | None = None,
                 source: str = "<tokenizer>", pre: str | None = None,
                 fim: fim_tokens.FimTokens | None | str = "detect") -> None:
        if kind not in (BYTE_LEVEL, METASPACE):
            raise TokenizerError(f"{source}: unknown tokenizer kind {kind!r}")
        self._source = source
        self.kind = kind
        pieces = tokenizer.get_vocab(with_added_tokens=False)
        added = tokenizer.get_added_tokens_decoder()
        size = max([*pieces.values(), *added, -1]) + 1
        if vocab_size is not None:
            if vocab_size < size:
                raise TokenizerError(f"{source}: vocab_size {vocab_size} is smaller than the "
                                     f"tokenizer's {size} ids")
            size = vocab_size
        if size == 0:
            raise TokenizerError(f"{source}: the vocabulary is empty")
        self._table, self._names = id_tables(kind, pieces, added, size)
        self.special_ids = tuple(sorted(i for i, t in added.items() if t.special))
        self._special_text = {added[i].content: i for i in self.special_ids}
        for what, i in (("bos_id", bos_id), ("pad_id", pad_id),
                        *(("end id", e) for e in end_ids)):
            if i is not None and not 0 <= i < size:
                raise TokenizerError(f"{source}: {what} {i} is outside the vocabulary "
                                     f"[0, {size})")
        if not end_ids:
            raise TokenizerError(f"{source}: no end-of-sequence token")
        self.bos_id = bos_id
        self.end_ids = tuple(end_ids)
        self.eos_id = self.end_ids[0]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        # The GGUF name of the pre-tokenizer (tokenizer.ggml.pre), kept so an export can
        # name it again; None where the split rules match no name GGUF knows.
        self.pre = pre if pre is not None else gguf_pre_name(tokenizer)

        # Two library tokenizers: one reads special-token text as text, one matches it.
        self._lib = tokenizer
        self._lib.encode_special_tokens = True
        self._lib_special = _LibTokenizer.from_str(tokenizer.to_str())
        self._lib_special.encode_special_tokens = False
        self._unencodable = unencodable_bytes(kind, pieces, source)
        self._meta_ids: list[int] | None = None
        if kind == METASPACE:
            self._meta_ids = [pieces[f"<0x{b:02X}>"] for b in META.encode("utf-8")]
        # A dummy prefix space: encode plain text through a copy without it and put the
        # space in front of every text ourselves, as SentencePiece does (the library's
        # Metaspace and ByteLevel skip it for text that starts with a space).
        self.prefix_space = self.decode_bytes(
            self._lib.encode("a", add_special_tokens=False).ids) == b" a"
        self._bare = self._without_prefix() if self.prefix_space else None
        self._probe()
        # Fill-in-the-middle markers: given (from a GGUF file or tokenizer_meta.json), or
        # found from the vocabulary's spellings ("detect"); None when it has none.
        if isinstance(fim, str):
            if fim != "detect":
                raise TokenizerError(f"{source}: fim must be a FimTokens, None or 'detect'")
            fim = fim_tokens.detect(self.token_to_id)
        try:
            self.fim = fim.check(size, source) if fim is not None else None
        except ValueError as e:
            raise TokenizerError(str(e)) from None

    # ---- construction helpers --------------------------------------------------------

    def _probe(self) -> None:
        probe = "".join(c for c in _PROBE if not (
            self._unencodable and self._unencodable.search(c.encode("utf-8"))))
        want = " " + probe if self.prefix_space else probe
        got = self.decode(self.encode(probe))
        if got != want:
            raise TokenizerError(f"{self._source}: the tokenizer does not reproduce text "
                                 f"exactly (a normaliser changes it: {want!r} came back as "
                                 f"{got!r})")

    def _without_prefix(self) -> tuple[_LibTokenizer, _LibTokenizer]:
        """Copies of the library tokenizer (plain, matching specials) adding no prefix."""
        spec = json.loads(self._lib.to_str())

        def strip(node: Any) -> Any:
            if isinstance(node, dict):
                if node.get("type") == "Prepend":
                    return None
                if node.get("type") == "Metaspace":
                    node = {**node, "prepend_scheme": "never"}
                    if "add_prefix_space" in node:
                        node["add_prefix_space"] = False
                if node.get("type") == "ByteLevel":
                    node = {**node, "add_prefix_space": False}
                return {k: strip(v) for k, v in node.items()}
            if isinstance(node, list):
                return [x for x in (strip(v) for v in node) if x is not None]
            return node

        spec["normalizer"] = strip(spec.get("normalizer"))
        spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
        plain = _LibTokenizer.from_str(json.dumps(spec))
        plain.encode_special_tokens = True
        matching = _LibTokenizer.from_str(json.dumps(spec))
        matching.encode_special_tokens = False
        return plain, matching

    # ---- the interface -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def id_to_piece(self, token_id: int) -> str:
        return self._names[self._check_ids([token_id])[0]]

    def tokenizer_json(self) -> str:
        """The library tokenizer as tokenizer.json text (what Hugging Face loads)."""
        return self._lib.to_str()

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece or added token ("<|im_end|>", "Ġthe"), else None."""
        return self._lib.token_to_id(piece)

    def _check_text(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        data = _utf8(text)
        if self._unencodable is not None and (m := self._unencodable.search(data)):
            offset = len(data[:m.start()].decode("utf-8", errors="ignore"))
            raise TokenizerError(
                f"character U+{ord(text[offset]):04X} at offset {offset} cannot be encoded: "
                f"this vocabulary has no token for byte 0x{data[m.start()]:02X}")

    def _encode_part(self, text: str, special: bool, first: bool) -> list[int]:
        """Ids of a stretch of text; `first`: it starts the text (takes the dummy prefix)."""
        if self._bare is None:
            lib = self._lib_special if special else self._lib
        elif special and first:
            lib = self._lib_special  # chat text: the library's own prefix rules
        else:
            lib = self._bare[1 if special else 0]
            text = " " + text if first and not special else text
        return lib.encode(text, add_special_tokens=False).ids if text else []

    def _encode_one(self, text: str, special: bool, start: bool = True) -> list[int]:
        if not text:
            return []
        if self._meta_ids is None or META not in text:
            return self._encode_part(text, special, start)
        # A literal "▁" would read as a space: emit its UTF-8 bytes, encode the parts.
        first, *rest = text.split(META)
        ids = self._encode_part(first, special, start)
        for part in rest:
            ids += self._meta_ids + self._encode_part(part, special, False)
        return ids

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.add_bos:
            ids = [self.bos_id, *ids]  # type: ignore[list-item]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               special: bool = False, continues: bool = False) -> list[int]:
        """Text -> ids. bos prepends BOS only where the model adds one (`add_bos`); eos
        appends `eos_id`; special lets special-token text ("<|im_end|>") become its id;
        continues: the text goes on from earlier text, so it gets no dummy prefix space
        (the suffix of a fill-in-the-middle prompt)."""
        self._check_text(text)
        return self._wrap(list(self._encode_one(text, special, not continues)), bos, eos)

    def encode_batch(self, texts: Iterable[str], *, bos: bool = False, eos: bool = False,
                     special: bool = False) -> list[list[int]]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch() expects an iterable of str, not a single string")
        texts = list(texts)
        for t in texts:
            self._check_text(t)
        if self._meta_ids is not None and any(META in t for t in texts):
            rows = [self._encode_one(t, special) for t in texts]
        elif self._bare is not None and not special:
            rows = [e.ids for e in self._bare[0].encode_batch(
                [" " + t if t else "" for t in texts], add_special_tokens=False)]
        else:
            lib = self._lib_special if special else self._lib
            rows = [e.ids for e in lib.encode_batch(texts, add_special_tokens=False)]
        return [self._wrap(list(r), bos, eos) for r in rows]

    def __repr__(self) -> str:
        return (f"BPETokenizer({self._source!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, end_ids={self.end_ids})")

    # ---- saving and loading ------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """What `tokenizer_meta.json` holds besides the library's JSON."""
        return {"format": META_FORMAT, "version": META_VERSION, "kind": self.kind,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "end_ids": list(self.end_ids), "pad_id": self.pad_id, "add_bos": self.add_bos,
                "chat_template": self.chat_template, "special_ids": list(self.special_ids),
                "pre": self.pre, "fim": self.fim.to_json() if self.fim is not None else None}

    def save_to_dir(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json (the library's JSON) and tokenizer_meta.json into `path`."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / TOKENIZER_JSON).write_text(self._lib.to_str(), encoding="utf-8")
        (root / META_JSON).write_text(json.dumps(self.meta(), indent=1), encoding="utf-8")

    save = save_to_dir

    def serialized(self) -> bytes:
        """Everything that defines the tokenizer as bytes (what the token caches key on)."""
        return (json.dumps(self.meta(), sort_keys=True) + "\n" + self._lib.to_str()).encode()

    @classmethod
    def load_dir(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Read a directory written by `save_to_dir`."""
        root = Path(path)
        for name in (TOKENIZER_JSON, META_JSON):
            if not (root / name).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {root / name}")
        meta = read_versioned_json(root / META_JSON, META_FORMAT, META_VERSION, TokenizerError)
        lib = _read_lib(root / TOKENIZER_JSON)
        fim: fim_tokens.FimTokens | None | str = "detect"  # files written before "fim"
        try:
            if "fim" in meta:
                fim = None if meta["fim"] is None else fim_tokens.FimTokens.from_json(
                    meta["fim"], meta["vocab_size"], f"{root / META_JSON}: fim")
            tok = cls(lib, kind=meta["kind"], bos_id=meta["bos_id"], end_ids=meta["end_ids"],
                      pad_id=meta["pad_id"], add_bos=meta["add_bos"],
                      chat_template=meta["chat_template"], vocab_size=meta["vocab_size"],
                      source=str(root), pre=meta.get("pre"), fim=fim)
        except ValueError as e:
            raise TokenizerError(str(e)) from None
        except (KeyError, TypeError) as e:
            raise TokenizerError(f"{root / META_JSON} lacks or garbles field {e}") from None
        if list(tok.special_ids) != list(meta.get("special_ids", tok.special_ids)):
            raise TokenizerError(f"{root / META_JSON}: special ids differ from "
                                 f"{root / TOKENIZER_JSON}'s special tokens")
        return tok

    # ---- GGUF --------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *,
                           source: str = "GGUF metadata") -> BPETokenizer:
        """Build the tokenizer a GGUF file describes; `meta` maps GGUF keys to values.

        Supported: tokenizer.ggml.model "gpt2" (byte-level BPE) with a pre-tokenizer
        named in PRE_TOKENIZERS. Anything else is refused by name.
        """
        if not isinstance(meta, Mapping):
            raise TypeError(f"GGUF metadata must be a dict, got {type(meta).__name__}")
        # Plain Python values (a reader may hand over numpy arrays and scalars).
        meta = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in meta.items()}

        def need(key: str) -> Any:
            if key not in meta:
                raise TokenizerError(f"{source}: missing {key} (the file carries no complete "
                                     f"tokenizer)")
            return meta[key]

        model = need("tokenizer.ggml.model")
        if model != "gpt2":
            what = {"llama": "a SentencePiece vocabulary", "bert": "a WordPiece vocabulary",
                    "t5": "a Unigram vocabulary", "rwkv": "an RWKV vocabulary"}.get(model, "")
            raise TokenizerError(
                f"{source}: unsupported tokenizer.ggml.model {model!r}"
                f"{f' ({what})' if what else ''}; only byte-level BPE ('gpt2') is supported")
        pre = need("tokenizer.ggml.pre")
        if pre not in _PRE:
            raise TokenizerError(f"{source}: unsupported tokenizer.ggml.pre {pre!r}; "
                                 f"supported: {', '.join(PRE_TOKENIZERS)}")
        tokens = need("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens must be a non-empty list "
                                 f"of strings, got {type(tokens).__name__}")
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerError(f"{source}: tokenizer.ggml.tokens[{i}] is "
                                     f"{type(t).__name__}, not str")
        types = need("tokenizer.ggml.token_type")
        if not isinstance(types, (list, tuple)) or len(types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type must list one type per "
                                 f"token ({len(tokens)})")
        types = [_index(t, f"tokenizer.ggml.token_type[{i}]") for i, t in enumerate(types)]
        merges = need("tokenizer.ggml.merges")
        if not isinstance(merges, (list, tuple)):
            raise TokenizerError(f"{source}: tokenizer.ggml.merges must be a list of strings, "
                                 f"got {type(merges).__name__}")
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                raise TokenizerError(f"{source}: tokenizer.ggml.tokens[{i}] {t!r} repeats "
                                     f"token {vocab[t]}")
            vocab[t] = i
        pairs: list[tuple[str, str]] = []
        for i, m in enumerate(merges):
            if not isinstance(m, str):
                raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] is "
                                     f"{type(m).__name__}, not str")
            parts = m.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] {m!r} is not two "
                                     f"tokens separated by one space")
            for p in (parts[0], parts[1], parts[0] + parts[1]):
                if p not in vocab:
                    raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] {m!r} uses "
                                         f"{p!r}, which is not in tokenizer.ggml.tokens")
            pairs.append((parts[0], parts[1]))

        def opt_id(key: str) -> int | None:
            if meta.get(key) is None:
                return None
            i = _index(meta[key], f"{source}: {key}")
            if not 0 <= i < len(tokens):
                raise TokenizerError(f"{source}: {key} {i} is outside the vocabulary "
                                     f"[0, {len(tokens)})")
            return i

        eos = opt_id("tokenizer.ggml.eos_token_id")
        pre_tokenizer, ignore_merges, bos_default = build_pre_tokenizer(pre)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", bos_default)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{source}: tokenizer.ggml.add_bos_token must be a bool, "
                                 f"got {add_bos!r}")
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{source}: tokenizer.chat_template must be a string")

        lib = _LibTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        lib.pre_tokenizer = pre_tokenizer
        lib.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t == CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types) if t == USER_DEFINED]
        lib.add_special_tokens(special)
        lib.add_tokens(user)
        special_ids = {i for i, t in enumerate(types) if t == CONTROL}
        if eos is None:
            eos = next((vocab[t] for t in END_TEXTS if vocab.get(t) in special_ids), None)
            if eos is None:
                raise TokenizerError(f"{source}: missing tokenizer.ggml.eos_token_id and no "
                                     f"known end-of-text token in the vocabulary")
        ends = _dedup([eos, opt_id("tokenizer.ggml.eot_token_id"),
                       opt_id("tokenizer.ggml.eom_token_id"),
                       *(vocab.get(t) for t in END_TEXTS if vocab.get(t) in special_ids)])
        try:
            fim = fim_tokens.from_gguf_metadata(meta, len(tokens), vocab.get, source)
        except ValueError as e:
            raise TokenizerError(str(e)) from None
        return cls(lib, kind=BYTE_LEVEL, bos_id=opt_id("tokenizer.ggml.bos_token_id"),
                   end_ids=ends, pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                   add_bos=add_bos, chat_template=template, source=source, pre=pre, fim=fim)

    # ---- Hugging Face ------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str], *,
                    vocab_size: int | None = None) -> BPETokenizer:
        """Build the tokenizer of a Hugging Face model directory.

        Reads tokenizer.json, and where present tokenizer_config.json (add_bos_token,
        bos_token, eos_token, chat_template), chat_template.jinja, generation_config.json
        (eos_token_id, an int or a list) and config.json (bos/eos ids as a fallback).
        vocab_size: pad the id table to the model's embedding rows when they outnumber
        the tokenizer's ids (the padding ids decode to nothing and are never produced).
        """
        root = Path(path)
        tj = root / TOKENIZER_JSON
        if not tj.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_JSON} in {root}: Spark reads Hugging Face "
                                    f"tokenizers from tokenizer.json only")
        try:
            spec = json.loads(tj.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TokenizerError(f"{tj} is not valid JSON: {e}") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            raise TokenizerError(f"{tj} has no \"model\" object")
        kind = _hf_kind(spec, str(tj))
        lib = _read_lib(tj)
        tc = _read_json(root / "tokenizer_config.json")
        gc = _read_json(root / "generation_config.json")
        mc = _read_json(root / "config.json")
        added = lib.get_added_tokens_decoder()
        special_ids = {i for i, t in added.items() if t.special}

        def token_id(field: str) -> int | None:
            value = tc.get(field)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise TokenizerError(f"{root / 'tokenizer_config.json'}: {field} must be a "
                                     f"string or an object with \"content\"")
            i = lib.token_to_id(value)
            if i is None:
                raise TokenizerError(f"{root / 'tokenizer_config.json'}: {field} {value!r} is "
                                     f"not in {TOKENIZER_JSON}")
            return i

        def config_ids(cfg: dict, key: str, where: str) -> list[int]:
            value = cfg.get(key)
            if value is None:
                return []
            values = value if isinstance(value, list) else [value]
            return [_index(v, f"{root / where}: {key}") for v in values]

        bos = token_id("bos_token")
        if bos is None and "bos_token" not in tc:
            found = config_ids(mc, "bos_token_id", "config.json")
            bos = found[0] if found else None
        end_texts = [lib.token_to_id(t) for t in END_TEXTS]
        ends = _dedup([token_id("eos_token"),
                       *config_ids(gc, "eos_token_id", "generation_config.json"),
                       *config_ids(mc, "eos_token_id", "config.json"),
                       *(i for i in end_texts if i in special_ids)])
        if not ends:
            raise TokenizerError(f"{root}: no end-of-sequence token (tokenizer_config.json "
                                 f"eos_token, generation_config.json or config.json "
                                 f"eos_token_id)")
        add_bos = tc.get("add_bos_token")
        if add_bos is None:
            add_bos = _template_adds_bos(spec, bos)
        elif not isinstance(add_bos, bool):
            raise TokenizerError(f"{root / 'tokenizer_config.json'}: add_bos_token must be a "
                                 f"bool, got {add_bos!r}")
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{root / 'tokenizer_config.json'}: chat_template must be a "
                                 f"string")
        pad = token_id("pad_token")
        return cls(lib, kind=kind, bos_id=bos, end_ids=ends, pad_id=pad, add_bos=add_bos,
                   chat_template=template, vocab_size=vocab_size, source=str(root))


def _read_lib(path: Path) -> _LibTokenizer:
    try:
        return _LibTokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception with its parser's message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{path}: the tokenizers library cannot read it ({first})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return out


def _types(node: Any) -> list[str]:
    """Every component type named in a tokenizer.json subtree."""
    if isinstance(node, dict):
        return [*([node["type"]] if isinstance(node.get("type"), str) else []),
                *(t for v in node.values() for t in _types(v))]
    if isinstance(node, list):
        return [t for v in node for t in _types(v)]
    return []


def _hf_kind(spec: dict, where: str) -> str:
    """BYTE_LEVEL or METASPACE for a tokenizer.json Spark can decode exactly; else refuse."""
    model = spec["model"]
    mtype = model.get("type")
    byte_fallback = bool(model.get("byte_fallback"))
    if mtype == "Unigram" and not byte_fallback:
        raise TokenizerError(f"{where}: a Unigram model without byte_fallback is not supported "
                             f"(it cannot encode every text)")
    if mtype not in ("BPE", "Unigram"):
        raise TokenizerError(f"{where}: tokenizer model {mtype!r} is not supported; Spark reads "
                             f"byte-level BPE and SentencePiece-style BPE with byte_fallback")
    if "ByteLevel" in _types(spec.get("pre_tokenizer")) + _types(spec.get("decoder")):
        if mtype != "BPE":
            raise TokenizerError(f"{where}: a byte-level {mtype} model is not supported")
        return BYTE_LEVEL
    if byte_fallback:
        return METASPACE
    raise TokenizerError(f"{where}: a BPE model that is neither byte-level nor uses "
                         f"byte_fallback cannot encode every text; not supported")


def _template_adds_bos(spec: dict, bos: int | None) -> bool:
    """Whether tokenizer.json's post-processor starts a single text with BOS."""
    if bos is None:
        return False
    post = spec.get("post_processor") or {}
    posts = post.get("processors", [post]) if isinstance(post, dict) else []
    for p in posts:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0] if single else {}
            tok = first.get("SpecialToken") if isinstance(first, dict) else None
            if tok:
                ids = ((p.get("special_tokens") or {}).get(tok["id"]) or {}).get("ids") or []
                return bos in ids
    return False


def is_bpe_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a tokenizer written by `BPETokenizer.save_to_dir`."""
    return (Path(path) / TOKENIZER_JSON).is_file() and (Path(path) / META_JSON).is_file()


__all__ = ["BPETokenizer", "TokenizerError", "PRE_TOKENIZERS", "END_TEXTS", "byte_to_unicode",
           "BYTE_LEVEL", "METASPACE", "TOKENIZER_JSON", "META_JSON", "is_bpe_dir"]
