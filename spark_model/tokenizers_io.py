"""One place that knows every tokenizer a checkpoint directory can hold.

    tokenizer.model                        a SentencePiece model (`spark_model.tokenizer`)
    tokenizer.json + tokenizer_meta.json   a BPE tokenizer of an imported model (`spark_model.bpe`)

Each tokenizer class writes its own files with `save_to_dir(dir)`; `load_tokenizer(dir)`
reads whichever is there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from spark_model.bpe import META_JSON, TOKENIZER_JSON, BPETokenizer
from spark_model.tokenizer import Tokenizer, TokenizerError

SENTENCEPIECE_FILE = "tokenizer.model"
BPE_FILES = (TOKENIZER_JSON, META_JSON)
TOKENIZER_FILES = (SENTENCEPIECE_FILE, *BPE_FILES)  # every file a tokenizer may own
DESCRIPTION = f"{SENTENCEPIECE_FILE} or {' + '.join(BPE_FILES)}"

AnyTokenizer = Union[Tokenizer, BPETokenizer]


def tokenizer_kind(path: str | os.PathLike[str]) -> str | None:
    """"sentencepiece", "bpe" or None (no complete tokenizer) for a directory."""
    root = Path(path)
    has_sp = (root / SENTENCEPIECE_FILE).is_file()
    has_bpe = all((root / n).is_file() for n in BPE_FILES)
    if has_sp and has_bpe:
        raise TokenizerError(f"{root} holds two tokenizers ({SENTENCEPIECE_FILE} and "
                             f"{TOKENIZER_JSON}); keep one")
    return "sentencepiece" if has_sp else "bpe" if has_bpe else None


def load_tokenizer(path: str | os.PathLike[str]) -> AnyTokenizer:
    """The tokenizer stored in directory `path`, whichever kind it is."""
    root = Path(path)
    kind = tokenizer_kind(root)
    if kind == "sentencepiece":
        return Tokenizer.load(root / SENTENCEPIECE_FILE)
    if kind == "bpe":
        return BPETokenizer.load_dir(root)
    raise FileNotFoundError(f"no tokenizer in {root}: expected {DESCRIPTION}")


def save_tokenizer(tokenizer: AnyTokenizer, path: str | os.PathLike[str]) -> None:
    """Write `tokenizer`'s files into directory `path`."""
    save = getattr(tokenizer, "save_to_dir", None)
    if save is None:
        raise TypeError(f"{type(tokenizer).__name__} cannot be saved into a checkpoint "
                        "(it has no save_to_dir)")
    save(path)


def document_separator(tokenizer: AnyTokenizer) -> int | None:
    """The id a model without BOS sees between documents, or None when it has a BOS.

    Such a model (SmolLM2, Qwen2) was trained on a packed stream where each document follows
    the previous one's end-of-text: the end id spelled <|endoftext|> when there is one (not
    a chat model's end-of-turn), else its first end id.
    """
    if getattr(tokenizer, "add_bos", True):
        return None
    ends = list(getattr(tokenizer, "end_ids", (tokenizer.eos_id,)))
    named = [i for i in ends if tokenizer.decode([i]) == "<|endoftext|>"]
    return (named or ends)[0]


def document_ids(tokenizer: AnyTokenizer, text: str) -> list[int]:
    """A whole file as the model sees a document: its start, the text, its end.

    The start is BOS and the end EOS for a model that has a BOS; for one without, the
    document separator (`document_separator`) both starts and ends it. Either way every
    token of the text is predicted, and bits per byte count all of its bytes.
    """
    return documents_ids(tokenizer, [text])[0]


def documents_ids(tokenizer: AnyTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`document_ids` of many texts, encoded in one batch."""
    sep = document_separator(tokenizer)
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:  # a tokenizer with one-text encode only
        def batch(items, **kw):
            return [tokenizer.encode(t, **kw) for t in items]
    if sep is None:
        return [list(ids) for ids in batch(list(texts), bos=True, eos=True)]
    return [[sep, *ids, sep] for ids in batch(list(texts))]
