"""A Spark tokenizer in the forms other runtimes read: GGUF metadata and Hugging Face files.

    meta = gguf_tokenizer_meta(tokenizer)        # tokenizer.* keys for gguf_write.write_gguf
    warnings = write_hf_tokenizer(tokenizer, directory, max_seq_len)

Byte-level BPE (`bpe.BPETokenizer`) becomes a GGUF "gpt2" vocabulary (tokens as their
byte-level strings, merges, the pre-tokenizer's GGUF name) and the library's own
tokenizer.json. Spark's SentencePiece model (`tokenizer.Tokenizer`) becomes a GGUF
"llama" vocabulary (pieces, scores, piece types; no space prefix) and, for Hugging Face,
the model file itself with a LlamaTokenizer config.

Spark's SentencePiece encoder never shows the model a literal "▁" (U+2581): it encodes
that character as its three UTF-8 bytes, because "▁" is how SentencePiece spells a
space. Runtimes that read the model file (llama.cpp, transformers' LlamaTokenizer) read
a literal "▁" as a space instead, so text containing it tokenizes differently there;
`SENTENCEPIECE_CAVEAT` says so and the export warns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spark_model.bpe import BYTE_LEVEL, CONTROL, NORMAL, UNUSED, USER_DEFINED, BPETokenizer
from spark_model.formats.mapping import FormatError
from spark_model.tokenizer import Tokenizer

SENTENCEPIECE_CAVEAT = (
    "other runtimes read a literal '\u2581' (U+2581) in text as a space, where Spark "
    "encodes it as its UTF-8 bytes; text containing it tokenizes differently there")
# transformers' tokenizers also match special-token text ("<s>", "<|im_end|>") in plain
# text by default, where Spark does so only when asked (encode(..., special=True)).


def _check_kind(tokenizer: Any) -> None:
    if not isinstance(tokenizer, (BPETokenizer, Tokenizer)):
        raise FormatError(f"a {type(tokenizer).__name__} tokenizer has no export form "
                          "(supported: byte-level BPE and Spark's SentencePiece model)")


# ---- GGUF ------------------------------------------------------------------------------

def _bpe_gguf(tok: BPETokenizer) -> dict[str, Any]:
    if tok.kind != BYTE_LEVEL:
        raise FormatError("a SentencePiece-style BPE tokenizer (Metaspace with byte "
                          "fallback) has no GGUF form here; export to 'hf' instead")
    if tok.pre is None:
        raise FormatError("the tokenizer's pre-tokenizer matches none of the names GGUF "
                          "gives them (tokenizer.ggml.pre), so llama.cpp could not split "
                          "text the same way; export to 'hf' instead")
    spec = json.loads(tok.tokenizer_json())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if piece == "":  # an id the tokenizer never produces (padded vocabulary)
            tokens.append(f"<spark_unused_{i}>")
            types.append(UNUSED)
            continue
        tokens.append(piece)
        types.append(NORMAL if i not in added else CONTROL if added[i] else USER_DEFINED)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": tok.pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.add_bos_token": tok.add_bos}
    if tok.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tok.bos_id
    # Further end ids: llama.cpp stops on end-of-turn and end-of-message tokens too.
    for key, i in zip(("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"),
                      tok.end_ids[1:]):
        meta[key] = i
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _sentencepiece_gguf(tok: Tokenizer) -> dict[str, Any]:
    table = tok.piece_table()
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p for p, _, _ in table],
            "tokenizer.ggml.scores": [s for _, s, _ in table],
            "tokenizer.ggml.token_type": [t for _, _, t in table],
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.unknown_token_id": tok.unk_id,
            "tokenizer.ggml.padding_token_id": tok.pad_id,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False}


def gguf_tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    """The GGUF `tokenizer.*` keys describing `tokenizer` (FormatError if it has none)."""
    _check_kind(tokenizer)
    meta = _bpe_gguf(tokenizer) if isinstance(tokenizer, BPETokenizer) \
        else _sentencepiece_gguf(tokenizer)
    fim = getattr(tokenizer, "fim", None)
    if fim is not None:  # llama.cpp's /infill finds the fill-in-the-middle tokens by these
        for key, i in (("fim_pre", fim.prefix), ("fim_suf", fim.suffix), ("fim_mid", fim.middle),
                       ("fim_rep", fim.repo), ("fim_sep", fim.file_sep)):
            if i is not None:
                meta[f"tokenizer.ggml.{key}_token_id"] = i
    return meta


# ---- Hugging Face ----------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _bpe_hf(tok: BPETokenizer, root: Path, max_seq_len: int) -> None:
    spec = json.loads(tok.tokenizer_json())
    if tok.add_bos and spec.get("post_processor") is None:
        # transformers' generic fast tokenizer adds BOS only through a post-processor.
        bos = tok.id_to_piece(tok.bos_id)  # type: ignore[arg-type]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    (root / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    piece = tok.id_to_piece
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos,
              "add_eos_token": False,
              "bos_token": None if tok.bos_id is None else piece(tok.bos_id),
              "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
              "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    _write_json(root / "tokenizer_config.json", config)


def _sentencepiece_hf(tok: Tokenizer, root: Path, max_seq_len: int) -> None:
    (root / "tokenizer.model").write_bytes(tok.serialized())
    piece = tok.id_to_piece
    _write_json(root / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "add_prefix_space": False, "bos_token": piece(tok.bos_id),
        "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id),
        "pad_token": piece(tok.pad_id), "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len, "sp_model_kwargs": {}})


def write_hf_tokenizer(tokenizer: Any, directory: str | os.PathLike, max_seq_len: int
                       ) -> list[str]:
    """Write `tokenizer`'s Hugging Face files and generation_config.json into `directory`.

    Returns caveats (text on which the exported form tokenizes differently from Spark).
    """
    _check_kind(tokenizer)
    root = Path(directory)
    caveats: list[str] = []
    if isinstance(tokenizer, BPETokenizer):
        _bpe_hf(tokenizer, root, max_seq_len)
    else:
        _sentencepiece_hf(tokenizer, root, max_seq_len)
        caveats.append(SENTENCEPIECE_CAVEAT)
    gen = {"eos_token_id": list(tokenizer.end_ids), "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        gen["bos_token_id"] = tokenizer.bos_id
    _write_json(root / "generation_config.json", gen)
    return caveats
