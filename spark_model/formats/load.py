"""An imported model in Spark's terms: the model, its tokenizer and where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spark_model.formats.mapping import FormatError


def read(path: Path, kind: str, weights: str | None = None):
    """Read a GGUF file ('gguf') or a Hugging Face directory ('hf'): an `Imported`.

    weights: the format of the weight matrices (spark_model/packing.py): None as the source
    holds them (a GGUF file's Q8_0/Q4_0/Q4_1 blocks stay packed), "f32", or a packed format.
    """
    if kind == "gguf":
        from spark_model.formats.gguf import read_gguf

        return read_gguf(path, weights=weights)
    if kind == "hf":
        import dataclasses

        from spark_model import packing, quant
        from spark_model.checkpoint import param_shapes
        from spark_model.formats.hf import read_hf

        imported = read_hf(path)
        if weights is None:
            return imported
        notes: list[str] = []
        try:
            params = packing.convert(imported.params, param_shapes(imported.cfg), weights, notes)
        except quant.QuantError as e:
            raise FormatError(f"{path}: {e}") from None
        info = {**imported.info, "weights": packing.weights_label(params),
                **({"notes": notes} if notes else {})}
        return dataclasses.replace(imported, params=params, info=info)
    raise FormatError(f"cannot import a {kind!r} model")


def read_config(path: Path, kind: str):
    """The ModelConfig of any model form, from its metadata alone (no tensor is read)."""
    if kind == "checkpoint":
        from spark_model.checkpoint import load_config

        return load_config(path)
    if kind == "gguf":
        from spark_model.formats.gguf import read_gguf_config

        return read_gguf_config(path)
    import json

    from spark_model.formats.hf import config_from_hf

    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path / 'config.json'}: cannot read it: {e}") from None
    return config_from_hf(data, str(path / "config.json"))


def tokenizer_of(imported) -> Any:
    """The tokenizer an imported model carries: byte-level BPE, or, for a Hugging Face
    directory holding only a SentencePiece tokenizer.model (what `spark export` writes
    for Spark's own tokenizer), that model read as Spark's SentencePiece tokenizer."""
    from spark_model.bpe import BPETokenizer

    kind, source = imported.tokenizer_source
    if kind == "gguf":
        return BPETokenizer.from_gguf_metadata(source)
    if not (source / "tokenizer.json").is_file() and (source / "tokenizer.model").is_file():
        from spark_model.tokenizer import Tokenizer

        return Tokenizer.load(source / "tokenizer.model")
    # A Hugging Face model may have more embedding rows than tokens (Qwen2.5 pads its
    # vocabulary); the tokenizer's id table is padded to match, extra ids decode to nothing.
    return BPETokenizer.from_hf_dir(source, vocab_size=imported.cfg.vocab_size)


def load_imported(path: Path, kind: str, weights: str | None = None):
    """(Transformer, tokenizer, info) for a GGUF file or Hugging Face directory (`weights`
    as in `read`)."""
    from spark_model.checkpoint import model_from_flat

    imported = read(path, kind, weights)
    tokenizer = tokenizer_of(imported)  # before the model: a tokenizer error costs nothing
    if tokenizer.vocab_size != imported.cfg.vocab_size:
        raise FormatError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the "
                          f"model's vocabulary is {imported.cfg.vocab_size}")
    model = model_from_flat(imported.cfg, imported.params)
    return model, tokenizer, {"source": str(path), "kind": kind, **imported.info}
