"""Reading Hugging Face model directories (Llama, Mistral, Qwen2) into Spark.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and the tokenizer files (read by the tokenizer loader from
`Imported.tokenizer_source`). Reading goes in two phases: first everything small is
checked — the config, the index, every shard's header against its file size, each tensor's
name, shape and dtype, and the memory the float32 parameters will need — and only then are
tensors decoded, one at a time, from memory maps.

Fields a config.json leaves out take the value transformers' config class gives them
(transformers writes every field when it saves, so this matters for hand-written configs
only); the shape fields are required, since their class defaults describe 7B models.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from spark_model.config import ConfigError, ModelConfig, RopeScaling
from spark_model.formats.imported import Imported
from spark_model.formats.mapping import FormatError, check_tensors, expected_shapes, spark_params
from spark_model.formats.memory import available_memory, size_text
from spark_model.formats.safetensors_file import READABLE, SafetensorsReader, read_header

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files the tokenizer loader may read (generation_config.json names the end-of-turn ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")

# `architectures[0]` (or `model_type` when that list is absent) -> transformers' model_type.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}

# Defaults of transformers' LlamaConfig, MistralConfig and Qwen2Config (checked against
# transformers 5.24's configuration_{llama,mistral,qwen2}.py and the 4.x LlamaConfig
# signature): all three default tie_word_embeddings to False and rms_norm_eps to 1e-6.
# rope_theta 10,000 is LlamaConfig's 4.x keyword default and 5.x's
# RotaryEmbeddingConfigMixin.default_theta, which all three classes inherit.
# num_key_value_heads: Llama None (= heads); Mistral 8; Qwen2 32 (an explicit null = heads).
# Mistral's sliding_window defaults to 4096; Qwen2's window is off unless use_sliding_window.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32,
              "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
}
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10_000.0,
                    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# Buffers some older checkpoints saved next to the weights; recomputed, never read.
_IGNORED_SUFFIX = "rotary_emb.inv_freq"


# ---- detection -------------------------------------------------------------------------

def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a Hugging Face model directory (not a Spark checkpoint).

    True for a directory with safetensors weights, or with a config.json that is not a
    Spark checkpoint's (Spark's own config.json says "format": "spark-checkpoint"), so that
    read_hf can name what is wrong with a damaged one.
    """
    root = Path(path)
    if not root.is_dir():
        return False
    config = root / CONFIG_FILE
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format") == "spark-checkpoint":
                return False
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    if (root / SINGLE_FILE).is_file() or (root / INDEX_FILE).is_file():
        return True
    return config.is_file() and not (root / "manifest.json").exists()


# ---- config.json -----------------------------------------------------------------------

def _field(data: Mapping[str, Any], key: str, kind: type, source: str,
           default: Any = ...) -> Any:
    """data[key] checked to be an int (no bools, no 64.0) or a number or a bool."""
    if key not in data:
        if default is ...:
            raise FormatError(f"{source}: required field {key!r} is missing")
        return default
    value = data[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise FormatError(f"{source}: field {key!r} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def architecture(data: Mapping[str, Any], source: str) -> str:
    """The transformers model_type ("llama", "mistral", "qwen2") of a config, or FormatError."""
    archs = data.get("architectures")
    if archs:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise FormatError(f"{source}: 'architectures' must be a list of names, got {archs!r}")
        if archs[0] not in ARCHITECTURES:
            raise FormatError(f"{source}: architecture {archs[0]} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
        return ARCHITECTURES[archs[0]]
    model_type = data.get("model_type")
    if model_type is None:
        raise FormatError(f"{source}: neither 'architectures' nor 'model_type' says which "
                          "architecture this is")
    if model_type not in MODEL_TYPES:
        raise FormatError(f"{source}: model_type {model_type!r} is not supported (supported: "
                          f"{', '.join(MODEL_TYPES)})")
    return model_type


def _rope(data: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either config layout.

    transformers 4.x writes a top-level `rope_theta` and a `rope_scaling` dict (or null);
    5.x writes one `rope_parameters` dict holding `rope_theta` and `rope_type`. Like
    transformers, a `rope_scaling` dict wins over `rope_parameters`.
    """
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise FormatError(f"{source}: rope_scaling must be an object or null, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise FormatError(f"{source}: per-layer-type rope parameters ({', '.join(params)}) "
                          "are not supported")
    theta = _field(params, "rope_theta", float, source,
                   _field(data, "rope_theta", float, source, _COMMON_DEFAULTS["rope_theta"]))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    where = f"{source}: rope_scaling"
    try:
        if kind == "linear":
            return theta, RopeScaling(kind="linear", factor=_field(params, "factor", float, where))
        if kind == "llama3":
            return theta, RopeScaling(
                kind="llama3", factor=_field(params, "factor", float, where),
                low_freq_factor=_field(params, "low_freq_factor", float, where),
                high_freq_factor=_field(params, "high_freq_factor", float, where),
                original_max_position=_field(params, "original_max_position_embeddings", int,
                                             where))
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from None
    raise FormatError(f"{source}: rope scaling type {kind!r} is not supported (supported: "
                      "llama3, linear, or none)")


def _check_window(data: Mapping[str, Any], model_type: str, n_layers: int, max_pos: int,
                  source: str) -> None:
    """Refuse sliding-window attention that would change results within the context.

    Spark attends over every earlier position. A window at least as long as the context
    never hides anything, so it is the same model; a shorter one is not.
    """
    defaults = _DEFAULTS[model_type]
    if model_type == "mistral":
        window = data.get("sliding_window", defaults["sliding_window"])
        layers = "every layer"
    elif model_type == "qwen2":
        if not _field(data, "use_sliding_window", bool, source, False):
            return
        window = data.get("sliding_window", defaults["sliding_window"])
        first = _field(data, "max_window_layers", int, source, defaults["max_window_layers"])
        types = data.get("layer_types")
        sliding = ([i for i, t in enumerate(types) if t == "sliding_attention"]
                   if isinstance(types, list) else list(range(first, n_layers)))
        if not sliding:
            return
        layers = f"layers {sliding[0]}..{sliding[-1]}"
    else:
        return
    if window is None:
        return
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise FormatError(f"{source}: sliding_window must be a positive integer or null, "
                          f"got {window!r}")
    if window < max_pos:
        raise FormatError(
            f"{source}: sliding_window {window} is shorter than max_position_embeddings "
            f"{max_pos} ({layers}); Spark has no sliding-window attention, and full attention "
            f"would differ once a sequence is longer than {window} tokens")


def config_from_hf(data: Mapping[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """A config.json object -> ModelConfig, refusing what Spark cannot run exactly."""
    if not isinstance(data, dict):
        raise FormatError(f"{source}: must hold a JSON object, got {type(data).__name__}")
    model_type = architecture(data, source)
    defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[model_type]}
    quant = data.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise FormatError(f"{source}: quantized checkpoints ({method}) are not supported")
    act = _field(data, "hidden_act", str, source, defaults["hidden_act"])
    if act != "silu":
        raise FormatError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    if model_type == "llama" and _field(data, "mlp_bias", bool, source, False):
        raise FormatError(f"{source}: mlp_bias true is not supported (Spark's MLP has no biases)")
    vocab, d, f, layers, heads = (_field(data, k, int, source) for k in _REQUIRED)
    kv = data.get("num_key_value_heads", defaults["num_key_value_heads"])
    kv = heads if kv is None else _field(data, "num_key_value_heads", int, source, kv)
    head_dim = data.get("head_dim")
    if head_dim is None:
        if heads <= 0 or d % heads:
            raise FormatError(f"{source}: no head_dim, and hidden_size {d} is not a multiple of "
                              f"num_attention_heads {heads}")
        head_dim = d // heads
    else:
        head_dim = _field(data, "head_dim", int, source)
    max_pos = _field(data, "max_position_embeddings", int, source,
                     defaults["max_position_embeddings"])
    _check_window(data, model_type, layers, max_pos, source)
    theta, scaling = _rope(data, source)
    # Qwen2's q/k/v projections always carry biases; Llama's follow attention_bias (whose
    # o_proj bias Spark lacks: read_hf accepts it only when it is all zeros).
    bias = model_type == "qwen2" or (model_type == "llama" and _field(
        data, "attention_bias", bool, source, False))
    try:
        return ModelConfig(
            vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
            head_dim=head_dim, d_ff=f, rope_theta=theta, rope_scaling=scaling,
            max_seq_len=max_pos,
            norm_eps=_field(data, "rms_norm_eps", float, source, defaults["rms_norm_eps"]),
            tie_embeddings=_field(data, "tie_word_embeddings", bool, source,
                                  defaults["tie_word_embeddings"]),
            attn_bias=bias)
    except ConfigError as e:
        raise FormatError(f"{source}: {e}") from None


# ---- weights ---------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def _weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded model, the index's weight_map.

    Like transformers, a single model.safetensors is preferred over an index.
    """
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], None
    index = root / INDEX_FILE
    if not index.is_file():
        others = sorted(p.name for p in root.iterdir()
                        if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
        hint = f" (found {', '.join(others)}; only safetensors is read)" if others else ""
        raise FormatError(f"{root}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    data = _load_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise FormatError(f"{index}: needs a non-empty 'weight_map' of tensor name -> file")
    files = []
    for name in dict.fromkeys(wmap.values()):
        if Path(name).name != name or name in (".", ".."):
            raise FormatError(f"{index}: shard {name!r} is not a file name in the directory")
        if not (root / name).is_file():
            raise FormatError(f"{index}: shard {name} is missing from {root}")
        files.append(root / name)
    return files, wmap


def _check_memory(numels: list[int], source: str) -> None:
    """Refuse before reading when the float32 parameters cannot fit in available memory.

    Peak use is every parameter in float32 plus one tensor being decoded and transposed.
    """
    need = 4 * (sum(numels) + max(numels, default=0))
    have = available_memory()
    if have is not None and need > have:
        raise FormatError(f"{source}: the float32 parameters need {size_text(need)} but only "
                          f"{size_text(have)} of memory is available (MemAvailable)")


class _Tensors(Mapping[str, np.ndarray]):
    """Hugging Face name -> float32 array, decoded from its shard only when asked for."""

    def __init__(self, where: dict[str, SafetensorsReader]):
        self._where = where

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf(path: str | os.PathLike) -> Imported:
    """Read a Hugging Face Llama/Mistral/Qwen2 directory into Spark config and parameters.

    Raises FormatError, naming the file, field or tensor, for anything it cannot import
    exactly; all such checks happen before any tensor data is read.
    """
    root = Path(path)
    source = str(path)
    if not root.is_dir():
        raise FormatError(f"{source}: not a directory")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FormatError(f"{source}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    data = _load_json(config_path)
    cfg = config_from_hf(data, str(config_path))
    model_type = architecture(data, str(config_path))

    files, wmap = _weight_files(root)
    headers = [read_header(p) for p in files]
    where: dict[str, SafetensorsReader] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    entries = {}
    for header in headers:
        reader = SafetensorsReader(header)
        for name, entry in header.tensors.items():
            if name in where:
                raise FormatError(f"{source}: tensor {name} is in both "
                                  f"{where[name].header.path.name} and {header.path.name}")
            where[name], entries[name], shapes[name] = reader, entry, entry.shape
    if wmap is not None:
        for name, file in wmap.items():
            if name not in where or where[name].header.path.name != file:
                raise FormatError(f"{root / INDEX_FILE}: tensor {name} is not in shard {file}")

    ignored = sorted(n for n in shapes if n.endswith(_IGNORED_SUFFIX))
    if cfg.tie_embeddings and "lm_head.weight" in shapes:
        ignored.append("lm_head.weight")  # transformers ties it to the embedding on load.
    o_bias = []
    if model_type == "llama" and cfg.attn_bias:
        o_bias = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(cfg.n_layers)]
        for name in o_bias:
            if name not in shapes:
                raise FormatError(f"{source}: tensor {name} is missing")
            if shapes[name] != (cfg.d_model,):
                raise FormatError(f"{source}: tensor {name} has shape {shapes[name]}, the "
                                  f"config needs {(cfg.d_model,)}")
    for name in ignored + o_bias:
        del shapes[name]
    check_tensors(cfg, shapes, source)
    for name in shapes:
        if entries[name].dtype not in READABLE:
            raise FormatError(f"{where[name].header.path}: tensor {name} is stored as "
                              f"{entries[name].dtype}; readable dtypes are {', '.join(READABLE)}")
    _check_memory([math.prod(s) for s in expected_shapes(cfg).values()], source)

    for name in o_bias:  # Small (D,) reads: Spark has no output bias, so only zeros fit.
        if np.any(where[name].read(name)):
            raise FormatError(f"{source}: tensor {name} is non-zero, and Spark's attention "
                              "has no output-projection bias")
    try:
        params = spark_params(cfg, _Tensors({n: where[n] for n in shapes}))
    finally:
        for header_reader in set(where.values()):
            header_reader.close()
    stored = sorted({entries[n].dtype for n in shapes})
    info = {"format": "hf", "architecture": MODEL_TYPES[model_type], "model_type": model_type,
            "dtype": stored[0] if len(stored) == 1 else stored,
            "torch_dtype": data.get("torch_dtype", data.get("dtype")),
            "shards": len(files), "files": [p.name for p in files],
            "bytes": sum(p.stat().st_size for p in files), "ignored": ignored,
            "tokenizer_files": [n for n in TOKENIZER_FILES if (root / n).is_file()]}
    return Imported(cfg=cfg, params=params, tokenizer_source=("hf", root), source=source,
                    info=info)
