"""How the ids of a BPE vocabulary map to bytes, for exact decoding and encodability checks.

    table, names = id_tables(BYTE_LEVEL, pieces, added, vocab_size)  # id -> bytes, id -> piece

A byte-level (GPT-2 style) vocabulary spells each byte as one printable character
(`byte_to_unicode`), so a piece is turned back into bytes by inverting that map; a
SentencePiece-style (METASPACE) piece is its text with "▁" read as a space and
"<0xAB>" read as that byte; an added or special token is its text. `BPETokenizer` joins
these table entries to decode, so streaming never splits or alters a character. The same
maps tell which of the 256 bytes a vocabulary cannot encode (`unencodable_bytes`).

Kept apart from `bpe.py` so the byte-level rules can be read and checked on their own,
without the tokenizer's encoding and loading code around them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tokenizers import AddedToken

from spark_model.tokenizer import TokenizerError

BYTE_LEVEL, METASPACE = "byte_level", "metaspace"
META = "\u2581"  # SentencePiece's whitespace marker "▁"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 take the characters U+0100, U+0101, ... in byte order.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    extra = 0x100
    for b in range(256):
        if b not in out:
            out[b] = chr(extra)
            extra += 1
    return out


_B2U = byte_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def piece_bytes(kind: str, piece: str) -> bytes:
    """The bytes a vocabulary piece of a `kind` (BYTE_LEVEL or METASPACE) tokenizer stands for."""
    if kind == BYTE_LEVEL:
        try:
            return bytes([_U2B[c] for c in piece])
        except KeyError:  # not a byte-level piece (a stray added word): its text
            return piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(META, " ").encode("utf-8")


def id_tables(kind: str, pieces: Mapping[str, int], added: Mapping[int, AddedToken],
              size: int) -> tuple[list[bytes], list[str]]:
    """id -> bytes and id -> piece text for `size` ids (ids nobody uses: b"" and "").

    `pieces` is the model's vocabulary (piece -> id), `added` the added tokens (id ->
    token), whose text is their bytes.
    """
    table = [b""] * size
    names = [""] * size
    for piece, i in pieces.items():
        table[i], names[i] = piece_bytes(kind, piece), piece
    for i, tok in added.items():
        table[i], names[i] = tok.content.encode("utf-8"), tok.content
    return table, names


def unencodable_bytes(kind: str, pieces: Mapping[str, int],
                      source: str) -> re.Pattern[bytes] | None:
    """A pattern over UTF-8 text finding bytes this vocabulary cannot encode (None: all can).

    A byte-fallback (METASPACE) vocabulary lacking any byte piece is refused instead.
    """
    if kind == BYTE_LEVEL:
        missing = [b for b in range(256) if _B2U[b] not in pieces]
    else:
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in pieces]
        if missing:
            raise TokenizerError(
                f"{source}: the byte-fallback vocabulary lacks {len(missing)} of "
                f"the 256 byte pieces (first <0x{missing[0]:02X}>); text could be lost")
    if not missing:
        return None
    return re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]")
