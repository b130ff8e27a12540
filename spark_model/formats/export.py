"""Exporting a Spark model to the forms other runtimes run: GGUF and Hugging Face.

    export("runs/ft", to="gguf", out="ft.gguf")            # llama.cpp
    export(spark_model.load("x"), to="hf", out="ft-hf/")    # transformers

A GGUF file carries the tokenizer in its metadata (`tokenizer_export.gguf_tokenizer_meta`);
a Hugging Face directory holds config.json, model.safetensors, the tokenizer's files and
generation_config.json (every end id). Nothing existing is replaced unless `overwrite`,
and never half-written: the export is written next to its destination and renamed into
place only when complete. What a format cannot hold (a tokenizer with no GGUF form, rope
scaling a GGUF graph cannot apply) is refused with a one-line FormatError before any
tensor is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from spark_model import packing
from spark_model.atomic import move_into_place
from spark_model.config import ModelConfig
from spark_model.formats.mapping import FormatError

FORMATS = ("gguf", "hf")
DTYPES = ("float32", "float16")


def _source(model_or_path: Any) -> tuple[ModelConfig, dict[str, np.ndarray], Any, str]:
    """(config, Spark-named float arrays, tokenizer, name) of a loaded model or a path."""
    if hasattr(model_or_path, "model") and hasattr(model_or_path, "tokenizer"):
        from spark_model.checkpoint import flat_params

        m = model_or_path
        params = {k: packing.map_arrays(v, np.asarray) for k, v in flat_params(m.model).items()}
        name = Path(str(getattr(m, "path", None) or "spark")).name
        return m.model.cfg, params, m.tokenizer, name
    from spark_model.formats import detect, load as formats_load

    path = detect.resolve(model_or_path)
    kind = detect.detect(path)
    if kind == "checkpoint":
        from spark_model import checkpoint
        from spark_model.tokenizers_io import load_tokenizer

        _, model = checkpoint.load_params(path)
        params = {k: packing.map_arrays(v, np.asarray)
                  for k, v in checkpoint.flat_params(model).items()}
        return model.cfg, params, load_tokenizer(path), path.name
    imported = formats_load.read(path, kind)
    tokenizer = formats_load.tokenizer_of(imported)
    return imported.cfg, dict(imported.params), tokenizer, path.stem


def _hf_into(dest: Path, cfg: ModelConfig, params: dict, tokenizer: Any, dtype: str
             ) -> list[str]:
    """Write the Hugging Face directory in a temporary sibling, then move it to `dest`."""
    from spark_model.formats.hf_write import write_hf
    from spark_model.formats.tokenizer_export import write_hf_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.writing-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 is not what a model dir wants
    try:
        write_hf(tmp, cfg, params, dtype=dtype)
        caveats = write_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len)
        move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return caveats


def export(model_or_path: Any, to: str, out: str | os.PathLike, *, dtype: str = "float32",
           overwrite: bool = False) -> Path:
    """Write a model as a GGUF file (to="gguf") or a Hugging Face directory (to="hf").

    model_or_path: a loaded `SparkModel` or anything `spark_model.load` takes (a Spark
    checkpoint, a GGUF file, a Hugging Face directory, a fetched model's name). dtype:
    "float32" (exact) or "float16" for the float weight matrices. Packed weight matrices
    (spark_model/packing.py) go to GGUF as they are (Q8_0, Q4_0, Q4_1 tensors) and to a
    Hugging Face directory dequantized, with a warning. Returns the written path.
    """
    if to not in FORMATS:
        raise FormatError(f"export format must be one of {', '.join(FORMATS)}, got {to!r}")
    if dtype not in DTYPES:
        raise FormatError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dest = Path(out).expanduser().absolute()
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise FormatError(f"{dest} already exists; pass overwrite=True (--overwrite) to "
                          "replace it")
    if not dest.parent.is_dir():
        raise FormatError(f"{dest.parent}: the directory to write into does not exist")
    cfg, params, tokenizer, name = _source(model_or_path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise FormatError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                          f"vocabulary is {cfg.vocab_size}")
    if to == "gguf":
        from spark_model.formats.gguf_write import write_gguf
        from spark_model.formats.tokenizer_export import (SENTENCEPIECE_CAVEAT,
                                                          gguf_tokenizer_meta)

        meta = gguf_tokenizer_meta(tokenizer)  # refuses a tokenizer with no GGUF form
        if dest.is_dir():
            raise FormatError(f"{dest} is a directory; a GGUF export is one file")
        caveats = [SENTENCEPIECE_CAVEAT] if meta["tokenizer.ggml.model"] == "llama" else []
        write_gguf(dest, cfg, params, meta, dtype=dtype, name=name, overwrite=overwrite)
    else:
        if any(packing.is_packed(v) for v in params.values()):  # no block formats there
            from spark_model.checkpoint import param_shapes

            params = packing.convert(params, param_shapes(cfg), packing.F32)
            caveats = [f"packed weights written as {dtype} (a Hugging Face directory holds "
                       "no GGUF block format)"]
        else:
            caveats = []
        caveats += _hf_into(dest, cfg, params, tokenizer, dtype)
    for caveat in caveats:
        warnings.warn(f"{dest}: {caveat}", stacklevel=2)
    return dest
