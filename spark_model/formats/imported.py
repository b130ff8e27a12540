"""What every reader of a foreign model format returns: one frozen record.

A reader (`formats.gguf.read_gguf`, the Hugging Face directory reader) turns its source
into the pieces Spark needs to build and serve the model, and nothing more: the config,
the parameters under Spark's flat names, and where the tokenizer comes from. Building
the model (`checkpoint.model_from_flat`) and the tokenizer are the caller's steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spark_model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Imported:
    """A model read from a foreign format.

    cfg:              the model's configuration (param_dtype and dtype float32).
    params:           Spark flat parameter names ('blocks.0.attn.q', ...) -> float32 arrays
                      in Spark layouts (docs/checkpoint-format.md); `model_from_flat(cfg,
                      params)` builds the model.
    tokenizer_source: (kind, payload) saying where the tokenizer lives: ("gguf", dict of
                      the file's `tokenizer.*` metadata as plain Python values); other
                      readers use their own kind.
    source:           the path the model was read from.
    info:             facts about the source for reports (architecture, name, tensor
                      types and counts, ...); nothing in it is needed to run the model.
    """

    cfg: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer_source: tuple[str, object]
    source: str
    info: dict
