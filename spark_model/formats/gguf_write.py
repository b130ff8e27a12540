"""Writing a Spark model as a GGUF file that llama.cpp (and `formats.gguf`) read.

Architecture `llama` (or `qwen2` when the model has q/k/v biases), tensors in float32 or
float16 (norms and biases always float32); packed weight matrices (`quant.PackedWeight`,
spark_model/packing.py) are written as they are, as Q8_0, Q4_0 or Q4_1 tensors. Linear rope scaling is written as
`rope.scaling.*`; Llama 3.1 (llama3) scaling as llama.cpp's `rope_freqs.weight` tensor of
per-frequency divisors (llama architecture only). llama.cpp's `llama` graph applies RoPE to
interleaved pairs (2i, 2i+1) while Spark and Hugging Face pair (i, i + H/2), so the rows of
q and k are reordered per head on the way out; `qwen2` uses the half-split pairing and keeps
them as they are.

The tokenizer travels as its GGUF metadata: a dict of `tokenizer.*` keys with plain Python
values (what `formats.gguf.read_gguf_metadata` returns for a file, or what a tokenizer
exports), written with the value types the format expects for each key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spark_model import packing, quant
from spark_model.config import ModelConfig
from spark_model.formats.mapping import FormatError

# Value type of each tokenizer key (anything else given is refused, so typos surface).
_STRING_KEYS = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"}
_STRING_LIST_KEYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}
_INT_LIST_KEYS = {"tokenizer.ggml.token_type"}
_FLOAT_LIST_KEYS = {"tokenizer.ggml.scores"}
_ID_KEYS = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id"}
_BOOL_KEYS = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix"}


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows (i, i + H/2) of a half-split projection become rows (2i, 2i + 1).

    `w` is (heads * H, ...) in Hugging Face orientation; the result has the same shape.
    """
    h = w.shape[0] // n_heads
    heads = w.reshape(n_heads, 2, h // 2, *w.shape[1:])  # (heads, half, i, ...)
    return np.ascontiguousarray(np.swapaxes(heads, 1, 2)).reshape(w.shape)


def rope_divisors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1 scaling as llama.cpp holds it: what each rotary frequency is divided by.

    Shape (H/2,), float32; written as the `rope_freqs.weight` tensor, which llama.cpp's
    `llama` graph applies and `formats.gguf` turns back into the RopeScaling.
    """
    from spark_model.layers import rope_frequencies

    base = rope_frequencies(cfg.head_dim, cfg.rope_theta, None)
    return (base / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            ).astype(np.float32)


def _gguf_tensors(cfg: ModelConfig, params: Mapping[str, Any], arch: str
                  ) -> dict[str, Any]:
    """Spark parameters -> GGUF tensor names and (out, in) float32 arrays, or packed
    weights (already (out, in))."""
    nh, kh = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def get(name: str) -> np.ndarray:
        return np.asarray(params[name], np.float32)

    def mat(name: str) -> Any:  # a weight matrix in (out, in) orientation
        w = params[name]
        if packing.is_packed(w):
            return w
        return np.ascontiguousarray(packing.to_matrix(name, get(name)))

    def rope_rows(w: Any, n: int) -> Any:
        if arch != "llama":
            return w
        if packing.is_packed(w):  # whole rows of blocks move: nothing is requantized
            return packing.permute_rows(w, interleave_rope_rows(np.arange(w.shape[0]), n))
        return interleave_rope_rows(w, n)

    out = {"token_embd.weight": mat("embed"), "output_norm.weight": get("final_norm.scale")}
    if not cfg.tie_embeddings:
        out["output.weight"] = mat("lm_head")
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"blk.{i}."
        out[dst + "attn_norm.weight"] = get(src + "attn_norm.scale")
        out[dst + "ffn_norm.weight"] = get(src + "mlp_norm.scale")
        out[dst + "attn_q.weight"] = rope_rows(mat(src + "attn.q"), cfg.n_heads)
        out[dst + "attn_k.weight"] = rope_rows(mat(src + "attn.k"), cfg.n_kv_heads)
        out[dst + "attn_v.weight"] = mat(src + "attn.v")
        out[dst + "attn_output.weight"] = mat(src + "attn.o")
        if cfg.attn_bias:
            out[dst + "attn_q.bias"] = rope_rows(get(src + "attn.q_bias").reshape(nh),
                                                 cfg.n_heads)
            out[dst + "attn_k.bias"] = rope_rows(get(src + "attn.k_bias").reshape(kh),
                                                 cfg.n_kv_heads)
            out[dst + "attn_v.bias"] = get(src + "attn.v_bias").reshape(kh)
        out[dst + "ffn_gate.weight"] = mat(src + "mlp.gate")
        out[dst + "ffn_up.weight"] = mat(src + "mlp.up")
        out[dst + "ffn_down.weight"] = mat(src + "mlp.down")
    return {k: v if packing.is_packed(v) else np.ascontiguousarray(v) for k, v in out.items()}


def _file_type(tensors: Mapping[str, Any], dtype: str):
    """GGUF's general.file_type: the format most of the matrices are in."""
    import collections

    import gguf

    counts = collections.Counter(v.fmt if packing.is_packed(v) else dtype
                                 for v in tensors.values() if packing.is_packed(v) or
                                 np.ndim(v) == 2)
    top = counts.most_common(1)[0][0] if counts else dtype
    return {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[top]


def _add_tokenizer(writer, meta: Mapping[str, Any]) -> None:
    import gguf

    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.model" not in meta:
        raise FormatError("tokenizer metadata needs at least tokenizer.ggml.model and "
                          "tokenizer.ggml.tokens")
    for key, value in meta.items():
        if key in _STRING_KEYS:
            writer.add_string(key, str(value))
        elif key in _STRING_LIST_KEYS:
            writer.add_array(key, [str(v) for v in value])
        elif key in _INT_LIST_KEYS:
            writer.add_key_value(key, [int(v) for v in value], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.INT32)
        elif key in _FLOAT_LIST_KEYS:
            writer.add_key_value(key, [float(v) for v in value], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.FLOAT32)
        elif key in _ID_KEYS:
            writer.add_uint32(key, int(value))
        elif key in _BOOL_KEYS:
            writer.add_bool(key, bool(value))
        else:
            raise FormatError(f"unknown tokenizer metadata key {key!r}")


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, np.ndarray],
               tokenizer_meta: Mapping[str, Any], *, dtype: str = "float32",
               name: str | None = None, overwrite: bool = False) -> Path:
    """Write `params` (Spark flat names) of `cfg` with `tokenizer_meta` as a GGUF file.

    dtype: "float32" or "float16" for the float matrices; packed ones are written as their
    block format, byte for byte. Written to a temporary sibling and renamed into place, so
    an interrupted write never leaves a half file at `path`.
    """
    import gguf

    dest = Path(path).expanduser().absolute()
    if dest.exists() and not overwrite:
        raise FormatError(f"{dest} already exists; pass overwrite=True to replace it")
    if dtype not in ("float32", "float16"):
        raise FormatError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    arch = "qwen2" if cfg.attn_bias else "llama"
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and arch != "llama":
        # llama.cpp reads Llama 3.1 scaling from a rope_freqs tensor in its `llama` graph only.
        raise FormatError(f"a model with q/k/v biases (GGUF architecture {arch}) and llama3 "
                          "rope scaling cannot be written to GGUF")
    tensors = _gguf_tensors(cfg, params, arch)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        tensors["rope_freqs.weight"] = rope_divisors(cfg)
        from spark_model.formats.gguf import _llama3_from_factors

        try:  # the reader must recover the same frequencies from the divisors
            _llama3_from_factors(tensors["rope_freqs.weight"].astype(np.float64),
                                 cfg.head_dim, cfg.rope_theta,
                                 cfg.rope_scaling.original_max_position, str(dest))
        except FormatError as e:
            raise FormatError(f"llama3 rope scaling of this model (head_dim {cfg.head_dim}, "
                              f"rope_theta {cfg.rope_theta:g}) cannot be written to GGUF so "
                              f"that it reads back: {str(e).split(': ', 1)[-1]}") from None
    tmp = dest.with_name(f".{dest.name}.writing")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name or dest.stem)
        writer.add_block_count(cfg.n_layers)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
            writer.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling.original_max_position))
        elif cfg.rope_scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(cfg.rope_scaling.factor))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(_file_type(tensors, dtype))
        _add_tokenizer(writer, tokenizer_meta)
        for tname, array in tensors.items():
            if packing.is_packed(array):
                writer.add_tensor(tname, quant.to_gguf_blocks(array),
                                  raw_dtype=gguf.GGMLQuantizationType(
                                      quant.FORMATS[array.fmt].ggml_type))
                continue
            if dtype == "float16" and array.ndim == 2:
                array = array.astype(np.float16)
            writer.add_tensor(tname, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dest
