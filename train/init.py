"""`spark train --init MODEL`: the model a fine-tuning run starts from.

MODEL is anything `spark_model.load` takes (a Spark checkpoint, a GGUF file, a Hugging Face
directory, a fetched model's name). The run keeps its config and tokenizer and starts from
its weights as float32 arrays (block-quantized weights, such as a Q4_1 GGUF file's, are
expanded: training updates floats).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from spark_model.config import ModelConfig
from train.config import TrainError


@dataclasses.dataclass
class InitModel:
    """A loaded starting point: its config, tokenizer and float32 weights by name."""

    source: str  # what the user passed, resolved (an absolute path, or a registry name)
    description: str  # one line: what it is, for the run's log
    cfg: ModelConfig
    tokenizer: Any
    params: dict[str, np.ndarray]
    fingerprint: str  # train.lora.param_fingerprint of params


def resolve_source(source: str) -> str:
    """An absolute path when `source` names an existing file or directory, else `source`
    unchanged (a registry name, resolved by `spark_model.load`)."""
    path = Path(source).expanduser()
    return str(path.absolute()) if path.exists() else source


def load_init(source: str) -> InitModel:
    """Load `source` for training; TrainError (one line) when it cannot be trained."""
    import spark_model
    from spark_model import checkpoint

    try:
        loaded = spark_model.load(source, capacity=2, weights="f32")
    except Exception as e:  # noqa: BLE001 - load raises a project error per kind of problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"--init {source}: cannot load it: {first}") from None
    cfg = loaded.config
    if not hasattr(loaded.tokenizer, "encode_batch") or not hasattr(loaded.tokenizer,
                                                                    "serialized"):
        raise TrainError(f"--init {source}: its tokenizer ({type(loaded.tokenizer).__name__}) "
                         "cannot tokenize a training corpus")
    params = {}
    for name, value in checkpoint.flat_params(loaded.model).items():
        try:
            params[name] = np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise TrainError(f"--init {source}: parameter {name} is held as "
                             f"{type(value).__name__}, which the trainer cannot train") from None
    kind = (getattr(loaded, "source_info", None) or {}).get("kind", "model")
    desc = f"{kind} {source}"
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    from train.lora import param_fingerprint
    return InitModel(source=source, description=desc, cfg=cfg, tokenizer=loaded.tokenizer,
                     params=params, fingerprint=param_fingerprint(params))

