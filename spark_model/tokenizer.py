"""Lossless SentencePiece tokenizer for source code.

* Identity normalisation, no whitespace games: SentencePiece's defaults (NFKC,
  collapsing space runs, a dummy leading space) are built for prose and change
  code (NFKC folds "ｆ" into "f"; collapsing breaks indentation).  We train with
  ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``, and ``byte_fallback`` so any character encodes
  (unseen ones as their UTF-8 bytes, never ``<unk>``).
* Code-shaped pieces: ``split_by_whitespace=False`` and
  ``split_by_unicode_script=False`` let BPE learn pieces spanning newline +
  indent + keyword ("\n▁▁▁▁▁▁▁▁return") and letters + punctuation ("self.",
  "):\n").  Held-out stdlib at vocab 8192: 4.46 bytes/token, vs 3.38 (BPE) and
  3.32 (unigram) with SentencePiece's default word/script splitting.
* Our own decoder: ``sp.decode`` turns every "▁" (U+2581, SentencePiece's space
  marker) into a space, so a literal "▁" would not survive.  ``encode`` never
  shows SentencePiece a literal "▁": it splits the text there and emits the
  byte-fallback ids of its UTF-8 bytes.  ``decode`` maps ids through a per-id
  bytes table built once (byte piece -> that byte, normal piece -> text with
  "▁" -> " ", control ids -> b"").
* Fill-in-the-middle markers: ``train_tokenizer(..., fim_tokens=True)`` (what
  ``spark train`` uses) reserves ``FIM_PIECES`` as SentencePiece *control* pieces
  (ids 4, 5, 6, right after the four specials), and ``add_control_pieces`` appends
  them to an existing model (ids after its last piece, every old id unchanged).
  Control, not user-defined: a user-defined piece is produced by ``encode`` from
  any text that happens to spell it, a control piece never is; it decodes to
  nothing and is found by id (``token_to_id``), so ``Tokenizer.fim`` sees it.
"""
from __future__ import annotations

import codecs
import io
import itertools
import operator
import os
import pathlib
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from spark_model import fim as fim_tokens

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
META = "\u2581"  # SentencePiece's whitespace marker "▁"
MIN_VOCAB_SIZE = 320  # 256 byte pieces + 4 specials + room for characters/merges
# Fill-in-the-middle markers, spelled as fim.CONVENTIONS' first convention so `detect`
# finds them. No <fim_pad>: training never emits it, an infill ends at EOS.
FIM_PIECES = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")

# Settings shared by every training run; see the module docstring for why.
_TRAINER_SETTINGS: dict[str, object] = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # "▁▁▁▁", "▁▁▁▁▁▁▁▁" as single pieces
    split_digits=True,
    byte_fallback=True,
    # 0.9999 rather than 1.0: the stdlib's ~340 rare non-ASCII characters
    # (test data) otherwise each take a vocab slot; they fall back to bytes.
    character_coverage=0.9999,
    split_by_whitespace=False,
    split_by_unicode_script=False,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    minloglevel=2,  # failures still surface as exceptions; keep stderr quiet
)
# Probe checked on load: catches models trained with normalising settings.
_PROBE = "  x\u00a0=\t'ｆ\u0065\u0301'  \r\n\n    y\u200d\U0001f600 \u2581 "


class TokenizerError(ValueError):
    """Invalid text, ids, model file or training input."""


def _cpu_count() -> int:  # respects CPU affinity (containers) where available
    getaffinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(getaffinity(0))) if getaffinity else os.cpu_count() or 1


def _utf8(text: str, what: str = "text") -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # only lone surrogates get here
        raise TokenizerError(
            f"{what} is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} "
            f"at character offset {e.start} cannot be encoded as UTF-8") from None


class ByteTableDecoding:
    """Decoding shared by every tokenizer: ids -> bytes through a per-id table.

    Subclasses set `self._table` (list of bytes, one entry per id) in their constructor;
    a table, not the library's own decoder, so that any id sequence decodes to exactly its
    bytes and streamed text never splits a character.
    """

    _table: list[bytes]

    def _check_ids(self, ids: Iterable[int] | int) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy array/scalar: one C-level conversion
            ids = ids.tolist()  # type: ignore[union-attr]
        if hasattr(ids, "__index__"):  # a single id
            ids = [ids]  # type: ignore[list-item]
        try:
            out = [operator.index(i) for i in ids]  # type: ignore[union-attr]
        except TypeError:
            raise TypeError("token ids must be integers") from None
        n = len(self._table)
        if out and (min(out) < 0 or max(out) >= n):
            bad = next(i for i in out if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} out of range [0, {n})")
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._table
        return b"".join([table[i] for i in self._check_ids(ids)])

    def decode(self, ids: Iterable[int], errors: str = "strict") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class Tokenizer(ByteTableDecoding):
    """A trained SentencePiece model plus exact encode/decode."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<model>") -> None:
        self._sp = processor
        self._source = source
        if [processor.pad_id(), processor.unk_id(), processor.bos_id(),
                processor.eos_id()] != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:
            raise TokenizerError(f"{source}: special ids must be pad=0 unk=1 bos=2 eos=3")
        table: list[bytes] = []
        byte_ids: dict[int, int] = {}
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if processor.is_byte(i):  # "<0xAB>"
                byte_ids[int(piece[3:5], 16)] = i
                table.append(bytes([int(piece[3:5], 16)]))
            elif processor.is_control(i) or processor.is_unknown(i):
                table.append(b"")
            else:
                table.append(piece.replace(META, " ").encode("utf-8"))
        if len(byte_ids) != 256:
            raise TokenizerError(f"{source}: model was not trained with byte_fallback")
        self._table = table
        # A Jinja2 chat template, as Hugging Face tokenizers carry; trained models have none.
        self.chat_template: str | None = None
        self._meta_ids = [byte_ids[b] for b in META.encode("utf-8")]
        self._threads = _cpu_count()
        # Fill-in-the-middle markers, when the vocabulary has them (control or user-defined).
        self.fim: fim_tokens.FimTokens | None = fim_tokens.detect(self.token_to_id)
        if self.decode(self.encode(_PROBE)) != _PROBE:
            raise TokenizerError(f"{source}: model does not round-trip text exactly "
                                 "(trained with normalisation or whitespace collapsing?)")

    # -- loading / saving -------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Tokenizer:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(data))
        except (RuntimeError, OSError, TypeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({detail})") from None
        return cls(sp, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = os.fspath(path)
        try:
            data = pathlib.Path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model file not found: {path}") from None
        return cls.from_bytes(data, source=path)

    def serialized(self) -> bytes:
        return self._sp.serialized_model_proto()

    def save(self, path: str | os.PathLike[str]) -> None:
        pathlib.Path(path).write_bytes(self.serialized())

    def save_to_dir(self, path: str | os.PathLike[str]) -> None:
        """Write the model as `tokenizer.model` into directory `path` (a checkpoint)."""
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        self.save(pathlib.Path(path) / "tokenizer.model")

    # -- properties ---------------------------------------------------------
    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    end_ids = property(lambda self: (EOS_ID,))  # every id that ends generation
    add_bos = property(lambda self: True)  # encode(bos=True) prepends BOS_ID
    prefix_space = property(lambda self: False)  # decode(encode(x)) == x, no dummy prefix

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_ids([token_id])[0])

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece ("<fim_prefix>", "▁▁▁▁return"), else None."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def piece_table(self) -> list[tuple[str, float, int]]:
        """(piece, score, type) for every id, as the model file stores them; type is
        SentencePiece's piece type (1 normal, 2 unknown, 3 control, 4 user-defined,
        5 unused, 6 byte), the numbering GGUF's tokenizer.ggml.token_type also uses.
        What another runtime needs to rebuild the vocabulary."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.serialized())
        return [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]

    # -- encoding -----------------------------------------------------------
    def _segments(self, text: str) -> list[bytes]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        # A literal "▁" would decode as a space; split there (see module doc).
        return _utf8(text).split(META.encode("utf-8"))

    def _join(self, parts: list[list[int]], bos: bool, eos: bool) -> list[int]:
        ids = [BOS_ID] if bos else []
        for k, part in enumerate(parts):
            if k:
                ids.extend(self._meta_ids)
            ids.extend(part)
        if eos:
            ids.append(EOS_ID)
        return ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               special: bool = False, continues: bool = False) -> list[int]:
        """Text -> ids. `special` is accepted for the common interface: this model's
        control ids (pad, unk, bos, eos) have no text form, so text never produces them.
        So is `continues` (the text goes on from earlier text): this model adds no dummy
        prefix space, so a text encodes the same wherever it stands."""
        segments = self._segments(text)
        parts = [self._sp.encode(segments[0])] if len(segments) == 1 else self._sp.encode(segments)
        return self._join(parts, bos, eos)

    def encode_batch(self, texts: Iterable[str], *, bos: bool = False,
                     eos: bool = False, special: bool = False) -> list[list[int]]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch() expects an iterable of str, not a single string")
        per_text = [self._segments(t) for t in texts]
        flat = list(itertools.chain.from_iterable(per_text))
        encoded = iter(self._sp.encode(flat, num_threads=self._threads)) if flat else iter(())
        return [self._join([next(encoded) for _ in segs], bos, eos) for segs in per_text]


class StreamDecoder:
    """Incremental decoding for generation: never emits half a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        return self._decoder.decode(self._tokenizer.decode_bytes(ids))  # type: ignore[arg-type]

    def flush(self) -> str:
        """Emit what is left; an incomplete trailing character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


# -- training ---------------------------------------------------------------
def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Pack whole lines into chunks of at most max_bytes UTF-8 bytes.

    Multi-line chunks (not one line per sentence) so pieces can span
    "\\n" + indentation; cut at line ends so no piece is learned from an
    arbitrary mid-line cut; SentencePiece silently drops sentences longer than
    max_sentence_length, so only over-long lines are cut (at char boundaries).
    """
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text #{k} is {type(text).__name__}, not str")
        _utf8(text, f"training text #{k}")
        for part in text.split(META):  # encode() never shows "▁" to SentencePiece
            chunk: list[str] = []
            size = 0
            for line in re.findall(r"[^\n]*\n|[^\n]+", part):
                n = len(line.encode("utf-8"))
                if size + n > max_bytes and chunk:
                    yield "".join(chunk)
                    chunk, size = [], 0
                if n > max_bytes:  # rare: cut at character boundaries
                    data = line.encode("utf-8")
                    while data:
                        cut = min(max_bytes, len(data))
                        while cut < len(data) and data[cut] & 0xC0 == 0x80:
                            cut -= 1
                        yield data[:cut].decode("utf-8")
                        data = data[cut:]
                    continue
                chunk.append(line)
                size += n
            if chunk:
                yield "".join(chunk)


def _sample(sentences: Iterable[str], k: int, seed: int) -> list[str]:
    """Reservoir sample (Algorithm R) with our own seeded RNG.

    SentencePiece 0.2.3's own sampling (input_sentence_size +
    shuffle_input_sentence) picks a different sample in every process even
    after set_random_generator_seed(), so we never let it sample.
    """
    rng = random.Random(seed)
    kept: list[str] = []
    for n, sentence in enumerate(sentences):
        if n < k:
            kept.append(sentence)
        elif (j := rng.randrange(n + 1)) < k:
            kept[j] = sentence
    return kept


def _training_error(err: RuntimeError, vocab_size: int) -> Exception:
    msg = str(err)
    if m := re.search(r"Vocabulary size too high.*?<= (\d+)", msg):
        return TokenizerError(f"vocab_size={vocab_size} is too large for this corpus: "
                              f"it supports at most {m[1]} pieces; use more text or a smaller vocab")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return TokenizerError(f"vocab_size={vocab_size} is too small for this corpus: "
                              f"it needs at least {m[1]} (256 bytes + specials + characters)")
    return TokenizerError(f"SentencePiece training failed: {msg.strip().splitlines()[0]}")


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    path: str | os.PathLike[str] | None = None, *,
                    model_type: str = "bpe", max_sentence_bytes: int = 4096,
                    max_piece_length: int = 32, max_sentences: int = 20_000,
                    seed: int = 0, num_threads: int = 2,
                    fim_tokens: bool = False) -> Tokenizer:
    """Train a tokenizer on `texts` (whole files); optionally save it to `path`.

    BPE is the default: at vocab 8192 it compresses held-out Python better than
    unigram (4.19 vs 3.95 bytes/token, same settings, a quarter of the stdlib)
    and trains ~40x faster (~35 s for the whole 31 MB stdlib, ~1.5 GB RAM).
    `max_sentences` caps the chunks used (~3.5 KB each: ~70 MB of code, ~3.5 GB
    of trainer RAM); larger corpora are reservoir-sampled with `seed`.
    `fim_tokens` reserves the FIM_PIECES as control pieces (ids 4..6; the byte and
    learned pieces follow), as `spark train` does; off by default so other callers'
    vocabularies keep their ids.  Same
    input and arguments give byte-identical models; num_threads is fixed by
    default because SentencePiece records it in the model bytes (BPE training
    barely uses threads; unigram EM does).
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of str (e.g. a list of file contents)")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TokenizerError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: need at least "
                             f"{MIN_VOCAB_SIZE} (256 byte pieces + 4 specials + characters)")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if max_sentence_bytes < 64:
        raise TokenizerError("max_sentence_bytes must be at least 64")
    if max_sentences < 1:
        raise TokenizerError("max_sentences must be positive")
    # Materialised (SentencePiece keeps every sentence in memory anyway, at
    # ~50 bytes of RAM per byte of text), so bad input raises here, not as an
    # opaque RuntimeError from inside the C++ trainer.
    sentences = _sample(_sentences(texts, max_sentence_bytes), max_sentences, seed)
    if not sentences:  # SentencePiece's own message for this is blank
        raise TokenizerError("training corpus is empty: no non-empty text given")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # process-global; only unigram uses it
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            max_sentence_length=max_sentence_bytes,
            max_sentencepiece_length=max_piece_length,
            input_sentence_size=0,  # already sampled, reproducibly
            num_threads=num_threads,
            control_symbols=list(FIM_PIECES) if fim_tokens else [],
            **_TRAINER_SETTINGS)
    except RuntimeError as e:
        raise _training_error(e, vocab_size) from None
    tokenizer = Tokenizer.from_bytes(model.getvalue(), source="<trained model>")
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def add_control_pieces(tokenizer: Tokenizer, pieces: Iterable[str] = FIM_PIECES
                       ) -> Tokenizer:
    """`tokenizer` with `pieces` appended as control pieces: ids vocab_size, vocab_size + 1,
    ...; every existing piece keeps its id, and text encodes exactly as before (control
    pieces take no part in segmentation). TokenizerError when one is already a piece."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    pieces = list(pieces)
    present = [p for p in pieces if tokenizer.token_to_id(p) is not None]
    if present or len(set(pieces)) != len(pieces):
        raise TokenizerError(f"the tokenizer already has the piece(s) "
                             f"{', '.join(present) or 'given twice'}")
    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.serialized())
    for text in pieces:
        new = proto.pieces.add()
        new.piece, new.score, new.type = text, 0.0, pb.ModelProto.SentencePiece.CONTROL
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return Tokenizer.from_bytes(proto.SerializeToString(), source="<extended model>")


def stdlib_python_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library .py files (no third-party)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not excluded.intersection(p.relative_to(root).parts))
