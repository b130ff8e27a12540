"""Fill-in-the-middle: which tokens a model infills with, and the prompt they make.

A model trained to infill reads the text before the gap and the text after it, each behind
a marker token, then writes the middle after a third marker. `FimTokens` describes a
tokenizer's markers: their ids, their order (prefix-suffix-middle, "psm", or
suffix-prefix-middle, "spm"), the ids that end an infill besides the model's own end ids
(such as <fim_pad> or <file_sep>), and the repository-level ids (<repo_name>, <file_sep>)
that let other files be shown as context.

It is found from the vocabulary by the spellings of the common conventions (`detect`), or
from a GGUF file's tokenizer.ggml.fim_* keys (`from_gguf_metadata`); a BPE tokenizer keeps
it in tokenizer_meta.json. `prompt_ids` builds the prompt from ids: each text is encoded on
its own and the marker ids are put between, so text that happens to spell a marker stays
text and no marker depends on how special-token text would be tokenized.

This module imports no JAX: tokenizers import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

ORDERS = ("psm", "spm")


class NoFimTokens(ValueError):
    """The model's vocabulary has no fill-in-the-middle tokens."""


@dataclasses.dataclass(frozen=True)
class Convention:
    """One vocabulary's spellings: the three markers, then what ends an infill."""

    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    middle: tuple[str, ...]
    stops: tuple[str, ...] = ()
    repo: tuple[str, ...] = ()
    file_sep: tuple[str, ...] = ()
    order: str = "psm"


# Checked in this order; the first whose three markers are all in the vocabulary wins.
CONVENTIONS = (
    # StarCoder, SantaCoder and the models trained on their vocabulary.
    Convention(("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",),
               stops=("<fim_pad>", "<file_sep>", "<|endoftext|>", "<repo_name>"),
               repo=("<repo_name>", "<reponame>"), file_sep=("<file_sep>",)),
    # Qwen2.5-Coder, CodeGemma.
    Convention(("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",),
               stops=("<|fim_pad|>", "<|file_sep|>", "<|file_separator|>", "<|endoftext|>",
                      "<|repo_name|>"),
               repo=("<|repo_name|>",), file_sep=("<|file_sep|>", "<|file_separator|>")),
    # Code Llama (its SentencePiece pieces carry the space marker).
    Convention(("<PRE>", "\u2581<PRE>"), ("<SUF>", "\u2581<SUF>"), ("<MID>", "\u2581<MID>"),
               stops=("<EOT>", "\u2581<EOT>")),
    # DeepSeek-Coder: begin, hole and end mark prefix, suffix and middle.
    Convention(("<\uff5cfim\u2581begin\uff5c>",), ("<\uff5cfim\u2581hole\uff5c>",),
               ("<\uff5cfim\u2581end\uff5c>",), stops=("<|EOT|>",)),
)

# GGUF keys: the current names, then the older ones Code Llama conversions wrote.
GGUF_KEYS = {"prefix": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
             "suffix": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
             "middle": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
             "pad": ("tokenizer.ggml.fim_pad_token_id",),
             "repo": ("tokenizer.ggml.fim_rep_token_id",),
             "file_sep": ("tokenizer.ggml.fim_sep_token_id",)}


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """A tokenizer's fill-in-the-middle markers (see the module docstring)."""

    prefix: int
    suffix: int
    middle: int
    order: str = "psm"
    stops: tuple[int, ...] = ()  # ids that end an infill, besides the model's end ids
    repo: int | None = None  # <repo_name>: starts repository-level context
    file_sep: int | None = None  # <file_sep>: starts each file of that context

    def check(self, vocab_size: int, source: str = "fim") -> "FimTokens":
        """Itself, once every id is a token id and the order is known; else ValueError."""
        if self.order not in ORDERS:
            raise ValueError(f"{source}: order must be one of {', '.join(ORDERS)}, got "
                             f"{self.order!r}")
        named = [("prefix", self.prefix), ("suffix", self.suffix), ("middle", self.middle),
                 ("repo", self.repo), ("file_sep", self.file_sep),
                 *(("stops", s) for s in self.stops)]
        for name, i in named:
            if i is None and name in ("repo", "file_sep"):
                continue
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                raise ValueError(f"{source}: {name} id {i!r} is not a token id in "
                                 f"[0, {vocab_size})")
        if len({self.prefix, self.suffix, self.middle}) != 3:
            raise ValueError(f"{source}: prefix, suffix and middle must be three different ids")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "suffix": self.suffix, "middle": self.middle,
                "order": self.order, "stops": list(self.stops), "repo": self.repo,
                "file_sep": self.file_sep}

    @classmethod
    def from_json(cls, data: Any, vocab_size: int, source: str = "fim") -> "FimTokens":
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be an object or null, got {type(data).__name__}")
        unknown = set(data) - {"prefix", "suffix", "middle", "order", "stops", "repo",
                               "file_sep"}
        if unknown:
            raise ValueError(f"{source} has unknown field(s) {', '.join(sorted(unknown))}")
        try:
            stops = data.get("stops", [])
            if not isinstance(stops, list):
                raise ValueError(f"{source}: stops must be a list of ids")
            out = cls(prefix=data["prefix"], suffix=data["suffix"], middle=data["middle"],
                      order=data.get("order", "psm"), stops=tuple(stops),
                      repo=data.get("repo"), file_sep=data.get("file_sep"))
        except KeyError as e:
            raise ValueError(f"{source} lacks field {e}") from None
        return out.check(vocab_size, source)


def detect(token_to_id: Callable[[str], int | None]) -> FimTokens | None:
    """The markers of the first convention whose three markers the vocabulary has, else None.

    token_to_id maps a piece or added token's text to its id (None when absent).
    """
    def first(spellings: Sequence[str]) -> int | None:
        return next((i for s in spellings if (i := token_to_id(s)) is not None), None)

    for conv in CONVENTIONS:
        ids = [first(conv.prefix), first(conv.suffix), first(conv.middle)]
        if None in ids or len(set(ids)) != 3:
            continue
        stops = _dedup(token_to_id(s) for s in conv.stops)
        return FimTokens(*ids, order=conv.order, stops=stops, repo=first(conv.repo),
                         file_sep=first(conv.file_sep))
    return None


def from_gguf_metadata(meta: Mapping[str, Any], n_tokens: int,
                       token_to_id: Callable[[str], int | None],
                       source: str = "GGUF metadata") -> FimTokens | None:
    """The markers a GGUF file names (tokenizer.ggml.fim_pre/suf/mid_token_id, or the older
    prefix/suffix/middle keys), completed from the vocabulary; else what `detect` finds."""
    def key_id(what: str) -> int | None:
        for key in GGUF_KEYS[what]:
            value = meta.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value < n_tokens:
                raise ValueError(f"{source}: {key} {value!r} is not a token id in "
                                 f"[0, {n_tokens})")
            return value
        return None

    marks = [key_id("prefix"), key_id("suffix"), key_id("middle")]
    found = detect(token_to_id)
    if None in marks:
        if any(m is not None for m in marks):
            raise ValueError(f"{source}: names only some of the fill-in-the-middle tokens "
                             f"(prefix, suffix, middle ids: {marks})")
        return found
    pad, repo, sep = key_id("pad"), key_id("repo"), key_id("file_sep")
    if found is not None:  # the vocabulary's own stops and context ids fill the gaps
        repo = found.repo if repo is None else repo
        sep = found.file_sep if sep is None else sep
    return FimTokens(*marks, stops=_dedup([pad, sep, *(found.stops if found else ()), repo]),
                     repo=repo, file_sep=sep).check(n_tokens, source)


def _dedup(ids) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(i)
    return tuple(out)


def require(tokenizer: Any) -> FimTokens:
    """The tokenizer's markers, or NoFimTokens saying the model cannot infill."""
    fim = getattr(tokenizer, "fim", None)
    if fim is None:
        raise NoFimTokens("this model has no fill-in-the-middle tokens (such as <fim_prefix>, "
                          "<fim_suffix>, <fim_middle>), so it cannot take a suffix")
    return fim


def prompt_ids(tokenizer: Any, prefix: str, suffix: str, middle: str = "",
               extra: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The infilling prompt, as ids: BOS where the tokenizer adds one, other files' context
    (`extra`: (filename, text) pairs), then the markers around the encoded texts in the
    tokenizer's order, ending with `middle` (text the infill must start with) after the
    middle marker. psm: PRE prefix SUF suffix MID middle; spm: SUF suffix PRE prefix MID
    middle.

    The prefix is encoded as the start of a text (with the dummy space of tokenizers that
    add one); the suffix, the middle and the context continue a text (no dummy space).
    Raises NoFimTokens for a tokenizer without markers.
    """
    fim = require(tokenizer)
    for name, value in (("prefix", prefix), ("suffix", suffix), ("middle", middle)):
        if not isinstance(value, str):
            raise TypeError(f"the {name} must be a string, got {type(value).__name__}")

    def cont(text: str) -> list[int]:
        return tokenizer.encode(text, continues=True) if text else []

    ids = list(tokenizer.encode("", bos=True))
    if extra:
        if fim.repo is not None:
            ids += [fim.repo] + cont("project\n")
        for filename, text in extra:
            body = text if text.endswith("\n") or not text else text + "\n"
            if fim.file_sep is not None:
                ids += [fim.file_sep] + cont(f"{filename}\n{body}")
            else:
                ids += cont(body)
        if fim.file_sep is not None:
            ids.append(fim.file_sep)
    pre = tokenizer.encode(prefix) if prefix else []
    if fim.order == "psm":
        ids += [fim.prefix, *pre, fim.suffix, *cont(suffix)]
    else:
        ids += [fim.suffix, *cont(suffix), fim.prefix, *pre]
    return ids + [fim.middle, *cont(middle)]
