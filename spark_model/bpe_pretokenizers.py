"""Pre-tokenizers of byte-level BPE vocabularies, by the name GGUF gives them.

    pre_tokenizer, ignore_merges, bos_default = build_pre_tokenizer("smollm")

A GGUF file names its pre-tokenizer (`tokenizer.ggml.pre`) instead of spelling out the
split rules, so the rules for each supported name live here: the regular expressions
and the `tokenizers` pre-tokenizer steps (digit splitting, regex splits, GPT-2's byte-level
split) that reproduce each model's own tokenizer.json, plus two per-model facts GGUF
leaves implicit (whether whole vocabulary words win over merges, and whether BOS is
added when the file does not say). `PRE_TOKENIZERS` lists the names.

Kept apart from `bpe.py` because this table grows with every supported model family,
while the tokenizer around it does not change.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

# The split rules are the models' own (from their tokenizer.json files); GGUF names them.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


def _isolate(*patterns: str) -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]


def _bytes_only() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Digits(individual_digits=True)


# name -> (pre-tokenizer steps, ignore_merges, whether BOS is added when GGUF does not say)
_PRE: dict[str, tuple[Any, bool, bool]] = {
    "gpt2": (lambda: [_gpt2_split()], False, False),
    # SmolLM2, StarCoder: every digit alone, then GPT-2's split on the rest.
    "smollm": (lambda: [_digits(), _gpt2_split()], False, False),
    "starcoder": (lambda: [_digits(), _gpt2_split()], False, False),
    # Llama 3: whole vocabulary words win over merges.
    "llama-bpe": (lambda: [*_isolate(_LLAMA3_RE), _bytes_only()], True, True),
    "qwen2": (lambda: [*_isolate(_QWEN2_RE), _bytes_only()], False, False),
    "deepseek-coder": (lambda: [*_isolate("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK),
                                _digits(), _bytes_only()], False, False),
    # Older GGUF files: punctuation runs, GPT-2's split, number runs, then 3-digit groups.
    "default": (lambda: [*_isolate(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+",
                                   "[0-9][0-9][0-9]"), _bytes_only()], False, False),
}
PRE_TOKENIZERS = tuple(sorted(_PRE))


def build_pre_tokenizer(name: str) -> tuple[pre_tokenizers.PreTokenizer, bool, bool]:
    """A new pre-tokenizer for the GGUF name `name` (one of PRE_TOKENIZERS), with the
    model's ignore_merges and whether it adds BOS when GGUF does not say."""
    steps, ignore_merges, bos_default = _PRE[name]
    return pre_tokenizers.Sequence(steps()), ignore_merges, bos_default


def _split_rules(lib: Tokenizer) -> tuple[Any, bool]:
    """A library tokenizer's pre-tokenizer (as JSON) and its model's ignore_merges."""
    spec = json.loads(lib.to_str())
    return spec.get("pre_tokenizer"), bool(spec.get("model", {}).get("ignore_merges"))


def gguf_pre_name(lib: Tokenizer) -> str | None:
    """The GGUF pre-tokenizer name whose rules `lib` follows exactly (None: no name does).

    Compared as the library serialises both, so equal rules compare equal however the
    tokenizer.json they came from was spelled.
    """
    rules = _split_rules(lib)
    if rules[0] is None:
        return None
    for name in _PRE:
        probe = Tokenizer(models.BPE(ignore_merges=_PRE[name][1]))
        probe.pre_tokenizer = build_pre_tokenizer(name)[0]
        if _split_rules(probe) == rules:
            return name
    return None
