"""Spark: a compact Llama-family code model in JAX/Flax NNX, built for low-latency decoding.

    import spark_model
    m = spark_model.load("checkpoints/spark-tiny")

The public names below are imported on first use (PEP 562), so importing a light
submodule such as `spark_model.config` or the `spark` command does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {  # public name -> the module that defines it
    "SparkModel": "api", "default_checkpoint": "api", "load": "api",
    "CheckpointError": "checkpoint", "FormatError": "formats.mapping",
    "PRESETS": "config", "ConfigError": "config", "ModelConfig": "config",
    "RopeScaling": "config",
    "Tokenizer": "tokenizer", "TokenizerError": "tokenizer", "train_tokenizer": "tokenizer",
    "BPETokenizer": "bpe", "load_tokenizer": "tokenizers_io",
    "Transformer": "transformer", "abstract_model": "transformer", "init_model": "transformer",
    "param_count": "transformer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spark_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"spark_model.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from spark_model.api import SparkModel, default_checkpoint, load
    from spark_model.checkpoint import CheckpointError
    from spark_model.formats.mapping import FormatError
    from spark_model.config import PRESETS, ConfigError, ModelConfig, RopeScaling
    from spark_model.bpe import BPETokenizer
    from spark_model.tokenizer import Tokenizer, TokenizerError, train_tokenizer
    from spark_model.tokenizers_io import load_tokenizer
    from spark_model.transformer import Transformer, abstract_model, init_model, param_count
