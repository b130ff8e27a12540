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



def add_fim_tokens(start: InitModel) -> InitModel:
    """`start` with the fill-in-the-middle control pieces appended to its SentencePiece
    vocabulary (`spark_model.tokenizer.add_control_pieces`: ids V, V + 1, V + 2, every old id
    unchanged) and the embedding (and an untied output head) grown by one row (column) per
    new piece, each initialised to the mean of the old rows (columns). The old rows are
    untouched, so the grown model's logits for the old ids equal the old model's; a new
    marker's logit starts at the mean of the old logits. SettingsError (one line) when the
    vocabulary already has FIM tokens or is not a SentencePiece model."""
    from spark_model.tokenizer import FIM_PIECES, Tokenizer, TokenizerError, add_control_pieces
    from train.config import SettingsError
    from train.lora import param_fingerprint

    if not isinstance(start.tokenizer, Tokenizer):
        raise SettingsError(f"--add-fim-tokens extends a SentencePiece vocabulary; {start.source}"
                            f" has a {type(start.tokenizer).__name__}")
    if start.tokenizer.fim is not None:
        raise SettingsError(f"--add-fim-tokens: {start.source} already has fill-in-the-middle "
                            "tokens; use --fim-rate without it")
    try:
        tokenizer = add_control_pieces(start.tokenizer, FIM_PIECES)
    except TokenizerError as e:
        raise SettingsError(f"--add-fim-tokens: {e}") from None
    n_new = tokenizer.vocab_size - start.cfg.vocab_size
    params = dict(start.params)
    embed_vd = params["embed"]
    params["embed"] = np.concatenate(
        [embed_vd, np.repeat(embed_vd.mean(0, keepdims=True), n_new, 0)], 0)
    if "lm_head" in params:  # untied head, (D, V)
        head_dv = params["lm_head"]
        params["lm_head"] = np.concatenate(
            [head_dv, np.repeat(head_dv.mean(1, keepdims=True), n_new, 1)], 1)
    first = start.cfg.vocab_size
    return dataclasses.replace(
        start, cfg=start.cfg.replace(vocab_size=tokenizer.vocab_size), tokenizer=tokenizer,
        params=params, fingerprint=param_fingerprint(params),
        description=f"{start.description} + FIM tokens {', '.join(FIM_PIECES)} "
                    f"(ids {first}..{tokenizer.vocab_size - 1})")
