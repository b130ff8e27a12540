"""What every model reader returns: a config, Spark-named parameters and where they came from."""

from __future__ import annotations

import dataclasses

import numpy as np

from spark_model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Imported:
    """A model read from a foreign format, ready for `checkpoint.model_from_flat(cfg, params)`.

    tokenizer_source says where the tokenizer lives, for the tokenizer loader to read:
    ("hf", Path of the Hugging Face directory) or ("gguf", the GGUF reader's metadata).
    info holds facts for reports and logs (architecture, stored dtype, shard count, ...).
    """

    cfg: ModelConfig
    params: dict[str, np.ndarray]  # Spark flat names -> float32 arrays.
    tokenizer_source: tuple[str, object]
    source: str  # The file or directory read, as the user named it.
    info: dict
