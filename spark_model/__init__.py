"""Spark: a compact Llama-family code model in JAX/Flax NNX, built for low-latency decoding.

    import spark_model
    m = spark_model.load("checkpoints/spark-tiny")
"""

from spark_model.api import SparkModel, default_checkpoint, load
from spark_model.checkpoint import CheckpointError
from spark_model.config import PRESETS, ConfigError, ModelConfig, RopeScaling
from spark_model.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from spark_model.transformer import Transformer, abstract_model, init_model, param_count

__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "PRESETS", "RopeScaling", "SparkModel",
    "Tokenizer", "TokenizerError", "Transformer", "abstract_model", "default_checkpoint",
    "init_model", "load", "param_count", "train_tokenizer",
]
