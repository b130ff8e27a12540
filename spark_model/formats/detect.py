"""What a model argument names: a Spark checkpoint, a GGUF file, a Hugging Face directory,
or a registry name (`spark fetch`), decided from the files themselves, not from names."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spark_model.formats.mapping import FormatError

GGUF_MAGIC = b"GGUF"
KINDS = ("checkpoint", "gguf", "hf")


def resolve(source: str | os.PathLike) -> Path:
    """A path as given, or the fetched file of a registry name (`spark fetch NAME`)."""
    path = Path(source).expanduser()
    if path.exists() or not isinstance(source, str) or os.sep in source:
        return path
    from spark_model import registry

    found = registry.resolve(source)  # raises for a known name that is not fetched yet
    return path if found is None else found


def detect(path: Path) -> str:
    """'checkpoint', 'gguf' or 'hf' for an existing path; FormatError otherwise."""
    if not path.exists():
        raise FormatError(f"no model at {path}: the path does not exist (and it is not the "
                          "name of a known model; `spark fetch --list` lists those)")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        if path.suffix == ".gguf":
            raise FormatError(f"{path} is not a GGUF file: it starts with {magic!r}, "
                              f"not {GGUF_MAGIC!r}" if magic else f"{path} is empty")
        raise FormatError(f"{path} is a file but not a GGUF model; a Spark checkpoint or a "
                          "Hugging Face model is a directory")
    config = path / "config.json"
    if not config.is_file():
        raise FormatError(f"{path} holds no config.json: it is neither a Spark checkpoint "
                          "nor a Hugging Face model directory")
    try:
        meta = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{config} is not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("format") == "spark-checkpoint":
        return "checkpoint"
    return "hf"
