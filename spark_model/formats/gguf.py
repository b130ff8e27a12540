"""Reading GGUF files (llama.cpp's single-file model format) into Spark.

    imported = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model = checkpoint.model_from_flat(imported.cfg, imported.params)

Three steps read a file, cheapest first:

1. `inspect_gguf` (in `formats.gguf_header`) walks the header with its own bounds-checked
   parser and never reads tensor data: any damage is refused by name before anything is
   allocated.
2. The `gguf` package's `GGUFReader` then reads the metadata and maps the tensor data;
   `read_gguf_metadata` (also in `formats.gguf_header`) gives the metadata as plain
   Python values.
3. `read_gguf` (here) builds the `ModelConfig` from the `{arch}.*` keys, checks every
   tensor's name, type and shape and the memory the parameters need, then reads tensor by
   tensor into Hugging Face-named arrays that `mapping.spark_params` turns into Spark's
   layout.

Weight matrices stored as Q8_0, Q4_0 or Q4_1 stay packed (`quant.PackedWeight`, the file's
bytes regrouped; spark_model/packing.py): they are never expanded to float32. Matrices of
other block types are converted to the nearest of those (`NEAREST`: Q5_0, Q5_1, Q5_K and
Q6_K to q8_0, Q4_K to q4_1), and F32, F16 and BF16 ones read as float32 (exact); the
model's `source_info` counts each conversion. `weights=` asks for one format instead
(see `read_gguf`).

The header layer's public names (`inspect_gguf`, `read_gguf_metadata`, `GGUFHeader`,
`TensorInfo`, `ArrayInfo` and its constants) stay importable from this module.

Architectures: `llama` (Llama 1/2/3, TinyLlama, SmolLM2, CodeLlama, deepseek-coder,
Mistral) and `qwen2` (q/k/v biases). llama.cpp's converter reorders the q and k rows of
`llama` models for its interleaved-pair RoPE; they are put back in the rotate-half order
Spark uses. `qwen2` files keep the Hugging Face order (llama.cpp runs them with NEOX,
i.e. rotate-half, RoPE).

Every problem is a one-line `FormatError` that starts with the file's path.
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Iterator, Mapping

import gguf as gguflib
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from spark_model import packing, quant
from spark_model.config import ConfigError, ModelConfig, RopeScaling
from spark_model.formats.gguf_header import (  # noqa: F401 - public names re-exported
    DEFAULT_ALIGNMENT, HEADER_BYTES, INT64_MAX, MAGIC, MAX_DIMS, MAX_NAME_BYTES,
    SUPPORTED_VERSIONS, ArrayInfo, GGUFHeader, TensorInfo, _plain_metadata, _reader, _show,
    inspect_gguf, read_gguf_metadata)
from spark_model.formats.imported import Imported
from spark_model.formats.mapping import FormatError, check_tensors, expected_shapes, spark_params
from spark_model.formats.memory import available_memory, size_text

ARCHITECTURES = ("llama", "qwen2")
T = GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                   T.Q4_K, T.Q5_K, T.Q6_K)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# The packed format a matrix of each block type becomes: its own where Spark has it, else
# the nearest one that keeps at least its precision class (5 and 6 bits -> 8; Q4_K, which
# carries a minimum per sub-block, -> q4_1).
NEAREST = {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q8_0", T.Q5_1: "q8_0",
           T.Q5_K: "q8_0", T.Q6_K: "q8_0", T.Q4_K: "q4_1"}


# ---- the config ------------------------------------------------------------------------

_MISSING = object()


class _Meta:
    """Typed access to the `{arch}.*` keys; a missing or ill-typed key is named."""

    def __init__(self, meta: Mapping[str, Any], arch: str, path: str):
        self.meta, self.arch, self.path = meta, arch, path

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is _MISSING:
            raise FormatError(f"{self.path}: metadata key {full} is missing (the {self.arch} "
                              f"architecture needs it)")
        return default

    def count(self, key: str, default: Any = _MISSING) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{self.path}: metadata {self.arch}.{key} must be a positive "
                              f"integer, got {value!r:.60}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self.raw(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or value <= 0:
            raise FormatError(f"{self.path}: metadata {self.arch}.{key} must be a positive "
                              f"number, got {value!r:.60}")
        return float(value)


def _architecture(kv: Mapping[str, Any], path: str) -> str:
    arch = kv.get("general.architecture")
    if arch is None:
        raise FormatError(f"{path}: metadata key general.architecture is missing")
    if not isinstance(arch, str):
        raise FormatError(f"{path}: general.architecture must be a string, got {arch!r:.60}")
    if arch not in ARCHITECTURES:
        raise FormatError(f"{path}: architecture {_show(arch)} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def _rope_scaling(m: _Meta, tensors: Mapping[str, TensorInfo], reader_tensors: Mapping[str, Any],
                  head_dim: int, theta: float) -> RopeScaling | None:
    """`{arch}.rope.scaling.*` (or llama.cpp's precomputed rope_freqs tensor) -> RopeScaling."""
    path, arch = m.path, m.arch
    kind = m.raw("rope.scaling.type", None)
    scaling: RopeScaling | None = None
    if kind is None and m.raw("rope.scale_linear", None) is not None:
        factor = m.number("rope.scale_linear")  # older files' spelling of linear scaling
        kind = "linear" if factor != 1.0 else "none"
        scaling = RopeScaling(kind="linear", factor=factor) if factor != 1.0 else None
    elif kind is None or kind == "none":
        scaling = None
    elif kind == "linear":
        factor = m.number("rope.scaling.factor")
        try:
            scaling = RopeScaling(kind="linear", factor=factor) if factor != 1.0 else None
        except ConfigError as e:
            raise FormatError(f"{path}: {arch}.rope.scaling.factor: {e}") from None
    elif kind == "yarn":
        raise FormatError(f"{path}: rope scaling type 'yarn' ({arch}.rope.scaling.type) is "
                          f"not supported")
    else:
        raise FormatError(f"{path}: rope scaling type {kind!r:.40} ({arch}.rope.scaling.type) "
                          f"is not supported (supported: none, linear, and Llama 3's "
                          f"rope_freqs tensor)")
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise FormatError(f"{path}: both {kind} rope scaling and a rope_freqs.weight "
                              f"tensor; cannot tell which applies")
        info = tensors["rope_freqs.weight"]
        if info.shape != (head_dim // 2,):
            raise FormatError(f"{path}: tensor rope_freqs.weight has shape {info.shape}, "
                              f"the config needs ({head_dim // 2},)")
        factors = dequantize(reader_tensors["rope_freqs.weight"].data, info.ggml_type,
                             info.shape).astype(np.float64)
        original = m.raw("rope.scaling.original_context_length", 8192)
        scaling = _llama3_from_factors(factors, head_dim, theta, original, path)
    return scaling


def _llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float, original: Any,
                         path: str) -> RopeScaling | None:
    """Recover Llama 3.1 scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores, for Llama 3.1-style models, a `rope_freqs` tensor: the number each
    rotary frequency is divided by (1 for short wavelengths, `factor` for long ones, and
    1 / ((1 - s) / factor + s) in the band between, where s = (original / wavelength -
    low) / (high - low) is linear in the frequency). The band points give s on a line,
    whose slope and intercept fix low and high for a chosen `original` (the rule depends
    only on original/low and original/high, so any `original` gives the same model). The
    recovered parameters are checked by recomputing every divisor.
    """
    if not np.isfinite(factors).all() or (factors <= 0).any():
        raise FormatError(f"{path}: tensor rope_freqs.weight holds non-positive or "
                          f"non-finite values")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    if not isinstance(original, (int, float)) or isinstance(original, bool) or original <= 0:
        raise FormatError(f"{path}: rope.scaling.original_context_length must be positive, "
                          f"got {original!r:.40}")
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    tol = 1e-4 * factor
    band = (factors > 1.0 + tol) & (factors < factor - tol)
    unscaled = ~band & (np.abs(factors - 1.0) <= tol)
    if band.sum() < 2:
        raise FormatError(f"{path}: tensor rope_freqs.weight has {int(band.sum())} "
                          f"frequencies in the Llama 3 transition band; at least 2 are "
                          f"needed to recover its scaling parameters")
    smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    u = freqs[band] * float(original) / (2 * math.pi)  # original / wavelength
    slope, intercept = np.polyfit(u, smooth, 1)
    mismatch = ""
    scaling = None
    if slope > 0:
        low = -intercept / slope
        high = low + 1.0 / slope
        try:
            scaling = RopeScaling(factor=factor, low_freq_factor=float(low),
                                  high_freq_factor=float(high),
                                  original_max_position=int(original), kind="llama3")
        except ConfigError as e:
            mismatch = str(e)
    if scaling is not None:
        from spark_model.layers import rope_frequencies  # imports JAX; only needed here

        again = freqs / rope_frequencies(head_dim, theta, scaling)
        err = float(np.max(np.abs(again - factors) / factors))
        if err > 1e-3:
            mismatch, scaling = f"recomputed divisors differ by up to {err:.2g}", None
        elif not (unscaled == (np.abs(again - 1.0) <= tol)).all():
            mismatch, scaling = "its unscaled frequencies do not match", None
    if scaling is None:
        raise FormatError(f"{path}: tensor rope_freqs.weight does not follow the Llama 3.1 "
                          f"frequency-scaling rule ({mismatch or 'band not monotonic'})")
    return scaling


def _config(meta: Mapping[str, Any], arch: str, tensors: Mapping[str, TensorInfo],
            reader_tensors: Mapping[str, Any], n_tokens: int, path: str) -> ModelConfig:
    m = _Meta(meta, arch, path)
    experts = m.raw("expert_count", 0)
    if experts:
        raise FormatError(f"{path}: a mixture-of-experts model ({arch}.expert_count = "
                          f"{experts!r:.20}) is not supported")
    d_model = m.count("embedding_length")
    n_heads = m.count("attention.head_count")
    # The format makes head_count_kv optional: absent means one kv head per query head.
    n_kv_heads = m.count("attention.head_count_kv", n_heads)
    rope_dims = m.raw("rope.dimension_count", None)
    if m.raw("attention.key_length", None) is not None:
        head_dim = m.count("attention.key_length")
    elif rope_dims is not None:
        head_dim = m.count("rope.dimension_count")
    else:
        if d_model % n_heads:
            raise FormatError(f"{path}: {arch}.embedding_length {d_model} is not a multiple "
                              f"of {arch}.attention.head_count {n_heads} and no head size "
                              f"is given")
        head_dim = d_model // n_heads
    if rope_dims is not None and m.count("rope.dimension_count") != head_dim:
        raise FormatError(f"{path}: {arch}.rope.dimension_count {rope_dims} differs from "
                          f"the head size {head_dim}; partial rotary embedding is not "
                          f"supported")
    value_dim = m.raw("attention.value_length", None)
    if value_dim is not None and m.count("attention.value_length") != head_dim:
        raise FormatError(f"{path}: {arch}.attention.value_length {value_dim} differs from "
                          f"the key length {head_dim}; this is not supported")
    # The format's default base when rope.freq_base is absent is 10,000 (original RoPE).
    theta = m.number("rope.freq_base", 10_000.0)
    vocab = m.count("vocab_size", n_tokens)
    if n_tokens > vocab:
        raise FormatError(f"{path}: tokenizer.ggml.tokens has {n_tokens} entries, more than "
                          f"the model's vocabulary {vocab} ({arch}.vocab_size)")
    n_layers = m.count("block_count")
    if n_layers > len(tensors):  # a damaged count, refused before per-layer lists are built
        raise FormatError(f"{path}: {arch}.block_count is {n_layers}, more layers than the "
                          f"file has tensors ({len(tensors)})")
    try:
        return ModelConfig(
            vocab_size=vocab, d_model=d_model, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            d_ff=m.count("feed_forward_length"), rope_theta=theta,
            rope_scaling=_rope_scaling(m, tensors, reader_tensors, head_dim, theta),
            max_seq_len=m.count("context_length"),
            norm_eps=m.number("attention.layer_norm_rms_epsilon"),
            tie_embeddings="output.weight" not in tensors,
            attn_bias="blk.0.attn_q.bias" in tensors,
            param_dtype="float32", dtype="float32")
    except ConfigError as e:
        raise FormatError(f"{path}: the metadata describes no valid model: {e}") from None


def _tokenizer_metadata(meta: Mapping[str, Any], path: str) -> dict[str, Any]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise FormatError(f"{path}: metadata key tokenizer.ggml.tokens is missing (the "
                          f"tokenizer's vocabulary)")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise FormatError(f"{path}: tokenizer.ggml.tokens must be a non-empty array of "
                          f"strings")
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


# ---- tensors ---------------------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight",
                "attn_output.weight": "self_attn.o_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias",
                "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias",
                "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}
_HF_TO_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_TO_GGUF_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_BLOCK_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.([0-9]+)\.(.+)")
AUXILIARY = ("rope_freqs.weight",)  # read into the config, not a parameter


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of a llama/qwen2 model (None if unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def gguf_name(hf: str) -> str:
    """The GGUF name of a Hugging Face tensor name (inverse of hf_name)."""
    if hf in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf]
    match = _HF_BLOCK_RE.fullmatch(hf)
    assert match, hf
    return f"blk.{match.group(1)}.{_HF_TO_GGUF_BLOCK[match.group(2)]}"


def _check_tensor_set(cfg: ModelConfig, arch: str, tensors: Mapping[str, TensorInfo],
                      path: str) -> dict[str, str]:
    """GGUF name -> HF name for every parameter, after naming any missing, unexpected or
    misshapen tensor in GGUF terms; mapping.check_tensors then confirms in HF terms."""
    expected = expected_shapes(cfg)
    names: dict[str, str] = {}
    for name in tensors:
        if name in AUXILIARY:
            continue
        hf = hf_name(name)
        if hf is None or hf not in expected:
            raise FormatError(f"{path}: unexpected tensor {_show(name)} for this {arch} model")
        names[name] = hf
    present = set(names.values())
    missing = [gguf_name(hf) for hf in expected if hf not in present]
    if missing:
        raise FormatError(f"{path}: tensor {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, hf in names.items():
        if tensors[name].shape != expected[hf]:
            raise FormatError(f"{path}: tensor {name} has shape {tensors[name].shape} "
                              f"(GGUF dimensions {list(tensors[name].ne)}), the config "
                              f"needs {expected[hf]}")
    check_tensors(cfg, {hf: tensors[name].shape for name, hf in names.items()}, path)
    return names


def _check_types(tensors: Mapping[str, TensorInfo], path: str) -> None:
    for info in tensors.values():
        if info.ggml_type not in SUPPORTED_TYPES:
            raise FormatError(f"{path}: tensor {_show(info.name)} has type {info.type_name}, "
                              f"which is not supported (supported: "
                              f"{', '.join(t.name for t in SUPPORTED_TYPES)})")


def _check_memory(infos: list[TensorInfo], targets: Mapping[str, str], path: str) -> None:
    """Refuse before reading if the parameters cannot fit in memory.

    The need counted: every parameter as it will be held (float32, or the bytes of its
    packed format), plus twice the largest tensor in float32 (a converted tensor's float32
    copy and its re-laid-out or quantized copy exist together while it is converted).
    """
    avail = available_memory()
    if avail is None:
        return
    largest = max(infos, key=lambda t: t.n_elements)
    if largest.n_elements * 4 > avail:
        raise FormatError(f"{path}: tensor {largest.name} needs "
                          f"{size_text(largest.n_elements * 4)} in float32, more than the "
                          f"{size_text(avail)} of memory available")
    held = sum(t.n_elements * (4 if targets.get(t.name, packing.F32) == packing.F32
                               else quant.FORMATS[targets[t.name]].bytes_per_weight)
               for t in infos)
    need = int(held) + 2 * largest.n_elements * 4
    if need > avail:
        raise FormatError(f"{path}: reading needs about {size_text(need)} of memory (the "
                          f"parameters as held), only {size_text(avail)} is available")


def _converts(info: TensorInfo, target: str) -> bool:
    """Whether reading the tensor into `target` changes its values (float to float32 does
    not; a packed format read as itself does not)."""
    qtype = GGMLQuantizationType(info.ggml_type)
    if target == packing.F32:
        return qtype not in FLOAT_TYPES
    return quant.FORMATS[target].ggml_type != info.ggml_type


def _targets(infos: Mapping[str, TensorInfo], names: Mapping[str, str], weights: str | None,
             path: str) -> dict[str, str]:
    """GGUF name -> the weight format it is read into ("f32" or a packed one)."""
    out = {}
    for name in names:
        info = infos[name]
        qtype = GGMLQuantizationType(info.ggml_type)
        if len(info.shape) != 2 or info.shape[-1] % quant.BLOCK:  # norms, biases
            out[name] = packing.F32
            continue
        stored = packing.F32 if qtype in FLOAT_TYPES else NEAREST[qtype]
        if weights is None:
            out[name] = stored
        else:
            try:
                packing.check_not_wider(name, stored, weights)
            except quant.QuantError as e:
                raise FormatError(f"{path}: {e}") from None
            out[name] = weights
    return out


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor's raw data -> a new float32 array of NumPy `shape` (ne reversed).

    `raw` is the tensor's bytes (any dtype view of them: GGUFReader gives float32/float16
    arrays for F32/F16 and uint8 rows for the rest). The one place that turns stored
    tensors into float32; F32/F16 are converted directly, the block types by
    `gguf.quants.dequantize`.
    """
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise FormatError(f"unknown tensor type id {ggml_type}") from None
    if qtype not in SUPPORTED_TYPES:
        raise FormatError(f"tensor type {qtype.name} is not supported")
    shape = tuple(int(s) for s in shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if not shape or shape[-1] % block:
        raise FormatError(f"shape {shape} does not split into {qtype.name} blocks of {block}")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != n // block * type_size:
        raise FormatError(f"{qtype.name} data of shape {shape} needs {n // block * type_size} "
                          f"bytes, got {data.size}")
    if qtype == T.F32:
        return data.view("<f4").astype(np.float32).reshape(shape)
    if qtype == T.F16:
        return data.view("<f2").astype(np.float32).reshape(shape)
    rows = data.reshape(-1, shape[-1] // block * type_size)
    out = gguflib.quants.dequantize(rows, qtype)
    return np.asarray(out, np.float32).reshape(shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (rows (n_heads * H, ...) or a bias (n_heads * H,)).

    llama.cpp's converter reorders each head's rows from rotate-half order (the two
    halves [0, H/2) and [H/2, H) pair up) to interleaved order (rows 2i, 2i+1 pair up):
    interleaved row 2i + j of a head is rotate-half row j * H/2 + i. This puts them back.
    """
    rest = w.shape[1:]
    h = w.shape[0] // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, h // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


class _LazyHF(Mapping[str, Any]):
    """Hugging Face name -> float32 array or packed (out, in) weight, read when asked for
    (one at a time), in the format `targets` gives each GGUF name.

    `mapping.spark_params` asks for each tensor once, so at most one tensor's float32
    copy exists beside the Spark parameters being built.
    """

    def __init__(self, path: str, cfg: ModelConfig, arch: str, names: Mapping[str, str],
                 infos: Mapping[str, TensorInfo], reader_tensors: Mapping[str, Any],
                 targets: Mapping[str, str]):
        self.path, self.cfg, self.arch = path, cfg, arch
        self.by_hf = {hf: g for g, hf in names.items()}
        self.infos, self.reader_tensors, self.targets = infos, reader_tensors, targets

    def _rope_heads(self, name: str) -> int | None:
        """The head count whose q/k rows llama.cpp reordered (None: not reordered)."""
        if self.arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            return self.cfg.n_heads if ".attn_q." in name else self.cfg.n_kv_heads
        return None

    def __getitem__(self, hf: str) -> Any:
        name = self.by_hf[hf]
        info = self.infos[name]
        target = self.targets[name]
        if target != packing.F32 and quant.FORMATS[target].ggml_type == info.ggml_type:
            return self._packed(name, info, target)
        out = self._float(name, info)
        if target != packing.F32:
            try:
                return quant.quantize(out, target, name=name)
            except quant.QuantError as e:
                raise FormatError(f"{self.path}: {e}") from None
        return out

    def _packed(self, name: str, info: TensorInfo, fmt: str) -> quant.PackedWeight:
        """The tensor's blocks as they are, rows put back in rotate-half order for q/k."""
        raw = np.ascontiguousarray(self.reader_tensors[name].data).reshape(-1).view(np.uint8)
        try:
            w = quant.from_gguf_blocks(raw, fmt, info.shape, name=name)
        except quant.QuantError as e:
            raise FormatError(f"{self.path}: {e}") from None
        heads = self._rope_heads(name)
        if heads is not None:
            order = unpermute_rows(np.arange(info.shape[0]), heads)
            w = packing.permute_rows(w, order)
        return w

    def _float(self, name: str, info: TensorInfo) -> np.ndarray:
        try:
            out = dequantize(self.reader_tensors[name].data, info.ggml_type, info.shape)
        except FormatError as e:
            raise FormatError(f"{self.path}: tensor {name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the gguf package on odd data
            raise FormatError(f"{self.path}: tensor {name} cannot be dequantized "
                              f"({type(e).__name__}: {str(e)[:80]})") from None
        if not np.isfinite(out).all():
            raise FormatError(f"{self.path}: tensor {name} holds non-finite values "
                              f"(NaN or infinity)")
        heads = self._rope_heads(name)
        return out if heads is None else unpermute_rows(out, heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_hf)

    def __len__(self) -> int:
        return len(self.by_hf)


def _open(path: str):
    """Validate a GGUF file and read its metadata and config; no tensor data is read."""
    header = inspect_gguf(path)
    arch = _architecture(header.kv, path)
    if isinstance(header.kv.get("split.count"), int) and header.kv["split.count"] > 1:
        raise FormatError(f"{path}: part of a split GGUF ({header.kv['split.count']} files); "
                          f"merge the parts into one file first")
    infos = {t.name: t for t in header.tensors}
    _check_types(infos, path)
    reader = _reader(path)
    reader_tensors = {t.name: t for t in reader.tensors}
    for name, info in infos.items():
        got = reader_tensors.get(name)
        if got is None or int(got.data_offset) != info.offset or int(got.tensor_type) != \
                info.ggml_type:
            raise FormatError(f"{path}: the gguf package reads tensor {_show(name)} "
                              f"differently from the header walk; the file is inconsistent")
    meta = _plain_metadata(reader, path)
    tokenizer = _tokenizer_metadata(meta, path)
    cfg = _config(meta, arch, infos, reader_tensors, len(tokenizer["tokenizer.ggml.tokens"]),
                  path)
    return header, arch, infos, reader_tensors, meta, tokenizer, cfg


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The Spark config of a GGUF file, from its metadata alone (tensors are not read)."""
    return _open(os.fspath(path))[-1]


def read_gguf(path: str | os.PathLike, *, weights: str | None = None) -> Imported:
    """Read a llama or qwen2 GGUF file into a Spark config and parameters.

    weights: None keeps Q8_0/Q4_0/Q4_1 matrices packed as stored, converts other block
    types to the nearest of those (`NEAREST`) and reads float ones as float32; "f32"
    dequantizes everything; "q8_0", "q4_0" or "q4_1" puts every weight matrix in that
    format (a matrix already in it is kept bit for bit; one packed in a narrower format is
    refused rather than widened).
    """
    path = os.fspath(path)
    if weights is not None:
        try:
            packing.check_weight_format(weights)
        except quant.QuantError as e:
            raise FormatError(f"{path}: {e}") from None
    header, arch, infos, reader_tensors, meta, tokenizer, cfg = _open(path)
    names = _check_tensor_set(cfg, arch, infos, path)
    targets = _targets(infos, names, weights, path)
    _check_memory([infos[n] for n in names], targets, path)
    params = spark_params(cfg, _LazyHF(path, cfg, arch, names, infos, reader_tensors,
                                       targets))
    file_type = meta.get("general.file_type")
    try:
        file_type_name = gguflib.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = f"unknown ({file_type})"
    info = {"format": "gguf", "gguf_version": header.version, "architecture": arch,
            "name": meta.get("general.name"), "file_type": file_type_name,
            "tensor_types": dict(collections.Counter(t.type_name for t in header.tensors)),
            "n_tensors": len(header.tensors),
            "n_params": sum(infos[n].n_elements for n in names),
            "file_bytes": header.file_size, "weights": packing.weights_label(params)}
    converted = collections.Counter(
        f"{infos[n].type_name} -> {t}" for n, t in targets.items() if _converts(infos[n], t))
    if converted:  # e.g. {"Q6_K -> q8_0": 1}: what was not kept as the file holds it
        info["converted"] = dict(converted)
    return Imported(cfg=cfg, params=params, tokenizer_source=("gguf", tokenizer), source=path,
                    info=info)
