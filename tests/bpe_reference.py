"""A plain-Python byte-level BPE encoder, the tests' independent reference.

Written from the algorithm's description, sharing no code with spark_model.bpe:

1. Special tokens (only when asked) cut the text first; each becomes its id.
2. Pre-tokenization: a list of regular expressions applied in turn, each cutting every
   piece into its matches and the stretches between them (both kept).
3. Each piece's UTF-8 bytes are written with GPT-2's byte-to-character map.
4. Merging: while two adjacent symbols form a pair in the merge list, the pair of lowest
   rank is merged at every place it occurs, left to right. With `ignore_merges` a piece
   that is a vocabulary entry as a whole is taken as one token.

Slow but simple; results per piece are cached, since code repeats its words.
"""

from __future__ import annotations

import regex

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# name -> (regular expressions in order, ignore_merges)
SPLITS = {
    "gpt2": ([GPT2], False),
    "smollm": ([r"\p{N}", GPT2], False),
    "starcoder": ([r"\p{N}", GPT2], False),
    "llama-bpe": ([LLAMA3], True),
    "qwen2": ([QWEN2], False),
    "deepseek-coder": (["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"], False),
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], False),
}


def gpt2_bytes_map() -> dict[int, str]:
    """Byte -> character: printable Latin-1 bytes map to themselves, the rest to U+0100 on."""
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD))
                 | set(range(0xAE, 0x100)))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def split(text: str, patterns: list[str]) -> list[str]:
    pieces = [text]
    for pattern in patterns:
        rx = regex.compile(pattern)
        out = []
        for piece in pieces:
            at = 0
            for m in rx.finditer(piece):
                if m.start() > at:
                    out.append(piece[at:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                at = m.end()
            if at < len(piece):
                out.append(piece[at:])
        pieces = out
    return pieces


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], pre: str,
                 specials: dict[str, int] | None = None) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.patterns, self.ignore_merges = SPLITS[pre]
        self.specials = specials or {}
        self.byte_char = gpt2_bytes_map()
        self.cache: dict[str, list[int]] = {}

    def _merge(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        symbols = list(word)
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1),
                       key=lambda k: self.ranks.get((symbols[k], symbols[k + 1]), float("inf")))
            pair = (symbols[best], symbols[best + 1])
            if pair not in self.ranks:
                break
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        return [self.vocab[s] for s in symbols if s in self.vocab]

    def _piece(self, piece: str) -> list[int]:
        if piece not in self.cache:
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            self.cache[piece] = self._merge(word)
        return self.cache[piece]

    def encode(self, text: str, special: bool = False) -> list[int]:
        parts = [text]
        if special and self.specials:
            alternatives = "|".join(regex.escape(s) for s in
                                    sorted(self.specials, key=len, reverse=True))
            parts = regex.split(f"({alternatives})", text)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                for piece in split(part, self.patterns):
                    ids.extend(self._piece(piece))
        return ids
