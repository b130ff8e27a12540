"""The fill-in-the-middle transform of training documents.

With probability ``fim_rate`` (``spark train --fim-rate``; 0 unless given, 0.5 by default
with ``--add-fim-tokens``) a training document is cut at two character positions, drawn
uniformly and independently from 0 .. len(text) and sorted, into prefix, middle and suffix
(any of them may be empty), and stored as

    psm:  BOS <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle EOS
    spm:  BOS <fim_suffix> suffix <fim_prefix> prefix <fim_middle> middle EOS

``SPM_SHARE`` (one half) of the transformed documents take the spm order, the rest psm.
With ``lines`` > 0 (``spark train --fim-lines``) that share of the transformed documents is
cut at line starts instead, the middle being 1 to ``MAX_MIDDLE_LINES`` whole lines (uniform,
fewer at the end of the text), newlines included: the shape of an editor's line or block
completion, and of `spark eval --tasks infill`'s holes, where character cuts mostly start the
middle inside a line's indentation.
Everything before ``middle`` is exactly the prompt `spark_model.fim.prompt_ids` builds for
that order at inference (each part encoded on its own: the prefix as the start of a text,
suffix and middle as continuations), so the model learns to write the middle and then end
it with EOS, the id that ends an infill. A model without BOS gets its document separator
at both ends instead, as `spark_model.tokenizers_io.document_ids` frames plain documents.
The other documents stay ``BOS text EOS``, and validation documents are never transformed.

The draws come from SHA-256 of (run seed, document name): a document is transformed the
same way in every build of the cache, whatever the other documents are; the expected
fraction transformed is ``fim_rate``, and `count_transformed` says how many were. The line
draw comes from its own hash, so ``lines`` = 0 gives exactly the cuts of runs before it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from spark_model import fim as fim_mod
from train.corpus import Document

SPM_SHARE = 0.5  # of the transformed documents, those in suffix-prefix-middle order
MAX_MIDDLE_LINES = 8  # a line-cut middle spans 1 .. this many lines
VERSION = 1  # of the transform's rules; part of the token cache key


def cache_tag(rate: float, seed: int, lines: float = 0.0) -> str:
    """What the token cache key records of the transform (`lines` only when used, so the
    keys of runs before it stay valid)."""
    tag = f"fim v{VERSION} rate={float(rate)!r} spm={SPM_SHARE!r} seed={int(seed)}"
    if lines:
        tag += f" lines={float(lines)!r} max_lines={MAX_MIDDLE_LINES}"
    return tag + "\n"


def _units(seed: int, name: str) -> tuple[float, float, int, int]:
    """Four deterministic draws for one document: two uniforms in [0, 1) (transform?
    which order?) and two 64-bit integers (the cuts)."""
    digest = hashlib.sha256(f"spark fim\0{int(seed)}\0{name}".encode("utf-8")).digest()
    a, b, c, d = (int.from_bytes(digest[k:k + 8], "little") for k in range(0, 32, 8))
    return a / 2.0 ** 64, b / 2.0 ** 64, c, d


def _line_cut(text: str, c: int, d: int) -> tuple[int, int]:
    """Whole-line cuts: the middle starts at a line start drawn by `c` and spans 1 ..
    MAX_MIDDLE_LINES lines (drawn by `d`), the last one's newline included."""
    starts = [0] + [k + 1 for k, ch in enumerate(text) if ch == "\n" and k + 1 < len(text)]
    ends = starts[1:] + [len(text)]
    first = c % len(starts)
    last = min(first + d % MAX_MIDDLE_LINES, len(starts) - 1)
    return starts[first], ends[last]


def plan(text: str, name: str, rate: float, seed: int,
         lines: float = 0.0) -> tuple[str, int, int] | None:
    """(order, i, j) when the document is transformed (prefix text[:i], middle text[i:j],
    suffix text[j:]), else None. `lines`: the share of transformed documents cut at line
    starts (see the module docstring)."""
    u_fim, u_order, c, d = _units(seed, name)
    if not u_fim < rate:
        return None
    if lines and _units(seed, name + "\0lines")[0] < lines:
        i, j = _line_cut(text, c, d)
    else:
        i, j = sorted((c % (len(text) + 1), d % (len(text) + 1)))
    return ("spm" if u_order < SPM_SHARE else "psm"), i, j


def count_transformed(docs: Sequence[Document], rate: float, seed: int) -> int:
    return sum(plan(d.text, d.name, rate, seed) is not None for d in docs) if rate else 0


def fim_document_ids(tokenizer: Any, fim: fim_mod.FimTokens, prefix: str, middle: str,
                     suffix: str, order: str) -> list[int]:
    """One transformed document as ids (see the module docstring)."""
    from spark_model.tokenizers_io import document_separator

    def cont(text: str) -> list[int]:
        return list(tokenizer.encode(text, continues=True)) if text else []

    pre = list(tokenizer.encode(prefix)) if prefix else []
    if order == "psm":
        body = [fim.prefix, *pre, fim.suffix, *cont(suffix)]
    else:
        body = [fim.suffix, *cont(suffix), fim.prefix, *pre]
    body += [fim.middle, *cont(middle)]
    sep = document_separator(tokenizer)
    if sep is not None:
        return [sep, *body, sep]
    return [tokenizer.bos_id, *body, tokenizer.eos_id]


def documents_fim_ids(tokenizer: Any, docs: Sequence[Document], rate: float,
                      seed: int, lines: float = 0.0) -> list[list[int]]:
    """Each document's ids: transformed with probability `rate` (a share `lines` of them
    cut at line starts), else `document_ids`."""
    from spark_model.tokenizers_io import documents_ids

    fim = fim_mod.require(tokenizer)
    plans = [plan(d.text, d.name, rate, seed, lines) for d in docs]
    plain = iter(documents_ids(tokenizer, [d.text for d, p in zip(docs, plans) if p is None]))
    out = []
    for d, p in zip(docs, plans):
        if p is None:
            out.append(list(next(plain)))
        else:
            order, i, j = p
            out.append(fim_document_ids(tokenizer, fim, d.text[:i], d.text[i:j], d.text[j:],
                                        order))
    return out
