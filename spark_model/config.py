"""Model configuration: one frozen dataclass and its named presets.

Presets:
  tiny       CPU default shipped in checkpoints/ (~5M parameters, decodes fast on 2 cores).
  small      GPU-sized model (~90M parameters).
  llama3-8b  Published Llama 3.1 8B shapes; only ever built abstractly (for the compiler).
  llama3-70b Published Llama 3.1 70B shapes; only ever built abstractly.

All presets use Llama 3.1 rotary frequency scaling, so every position below
`max_seq_len` (131,072 = 128K) is a valid position. Rotary settings have no defaults:
every config states its `rope_theta` and `rope_scaling` (None for plain RoPE), because
a wrong guess still runs and silently changes the model (imported models come with
their own, see spark_model/formats).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MAX_CONTEXT = 131_072  # 128K: the context every preset supports.
MAX_POSITIONS = 1 << 24  # positions must lie below this (spark_model/rotary.py)

_DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_KINDS = ("llama3", "linear")


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """Frequency scaling of the rotary embedding.

    kind "llama3" (Llama 3.1, the published defaults below): wavelengths shorter than
    original/high_freq_factor are kept, longer than original/low_freq_factor divided by
    `factor`, and the band between interpolated. kind "linear" (position interpolation,
    e.g. deepseek-coder): every frequency is divided by `factor`; the band fields are unused.
    """

    factor: float = 8.0  # Low frequencies are divided by this.
    low_freq_factor: float = 1.0  # Wavelengths above original/low are fully scaled.
    high_freq_factor: float = 4.0  # Wavelengths below original/high are kept.
    original_max_position: int = 8192  # Context the unscaled frequencies were made for.
    kind: str = "llama3"  # "llama3" or "linear"

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise ConfigError(f"rope_scaling.kind must be one of {ROPE_SCALING_KINDS}, "
                              f"got {self.kind!r}")
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position <= 0:
            raise ConfigError("rope_scaling.original_max_position must be positive")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder.

    Axis letters used across the package (einsums, shape comments, tile names):
      B batch, T query positions, S key positions, D model width (d_model),
      N query heads, K kv heads, G query heads per kv head, H head dim,
      F feed-forward width (d_ff), V vocabulary, L layers.
    """

    vocab_size: int  # V: tokenizer vocabulary, including the special ids.
    d_model: int  # D: residual stream width.
    n_layers: int  # L: decoder blocks.
    n_heads: int  # N: query heads.
    n_kv_heads: int  # K: key/value heads (grouped-query attention); divides N.
    head_dim: int  # H: width of one head.
    d_ff: int  # F: SwiGLU hidden width.
    rope_theta: float  # Base of the rotary frequencies.
    rope_scaling: RopeScaling | None  # None: plain RoPE.
    max_seq_len: int = MAX_CONTEXT  # Largest position the model accepts.
    norm_eps: float = 1e-5  # RMSNorm epsilon.
    tie_embeddings: bool = True  # Output projection reuses the token embedding.
    attn_bias: bool = False  # q, k and v projections carry biases (Qwen2).
    param_dtype: str = "float32"  # Storage dtype of the parameters.
    dtype: str = "float32"  # Compute dtype of activations (bf16 for mixed precision).
    init_std: float = 0.02  # Std of the normal weight initialiser.

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embedding, got {self.head_dim}")
        if self.max_seq_len >= MAX_POSITIONS:
            raise ConfigError(f"max_seq_len must be below {MAX_POSITIONS:,} (the positions "
                              f"spark_model.rotary represents), got {self.max_seq_len:,}")
        if self.vocab_size < 4:
            raise ConfigError("vocab_size must hold at least the 4 special ids")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or None, "
                              f"got {type(self.rope_scaling).__name__}")
        for name in ("tie_embeddings", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")

    @property
    def group_size(self) -> int:
        """G: query heads that share one kv head."""
        return self.n_heads // self.n_kv_heads

    # ---- presets -------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset, with fields optionally overridden (unknown fields are an error)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields changed; misspelt field names are rejected."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(fields)}")
        if isinstance(overrides.get("rope_scaling"), dict):
            overrides["rope_scaling"] = RopeScaling(**overrides["rope_scaling"])
        return dataclasses.replace(self, **overrides)

    # ---- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"config is missing field(s) {missing}")
        data = dict(data)
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            try:
                data["rope_scaling"] = RopeScaling(**scaling)
            except TypeError as e:
                raise ConfigError(f"bad rope_scaling {scaling!r}: {e}") from None
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def _llama31(**kw: Any) -> ModelConfig:
    # Published Llama 3.1 settings shared by 8B and 70B (weights released in bfloat16).
    return ModelConfig(vocab_size=128_256, n_kv_heads=8, head_dim=128, rope_theta=500_000.0,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), tie_embeddings=False,
                       param_dtype="bfloat16", dtype="bfloat16", **kw)


PRESETS: dict[str, ModelConfig] = {
    # Sized for latency on a 2-core CPU: ~5.2M parameters, 21 MB in f32, which a
    # matrix-vector chain reads fast enough for >1,000 tokens/s at batch 1.
    "tiny": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=64, d_ff=768, rope_theta=500_000.0, rope_scaling=RopeScaling()),
    "small": ModelConfig(vocab_size=16_384, d_model=768, n_layers=12, n_heads=12,
                         n_kv_heads=4, head_dim=64, d_ff=2048, rope_theta=500_000.0,
                         rope_scaling=RopeScaling()),
    "llama3-8b": _llama31(d_model=4096, n_layers=32, n_heads=32, d_ff=14_336),
    "llama3-70b": _llama31(d_model=8192, n_layers=80, n_heads=64, d_ff=28_672),
}
