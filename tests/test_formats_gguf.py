"""GGUF import against independent references.

Tiny random models are written with the gguf package's own GGUFWriter, laid out as
llama.cpp's converter lays them out (q/k rows of `llama` models reordered for
interleaved RoPE, written here from the converter's rule, independently of the reader's
inverse), read back with read_gguf, and the built model's logits are compared with the
float64 NumPy reference forward run on the ORIGINAL Spark-layout parameters. Block types
are checked against the package's quantizers and, for Q8_0/Q4_0/Q4_1, against
dequantizers written here from the published block layouts; the K-quants (which the
package cannot quantize) against block encoders written here. Every bad input is a
crafted file that must be refused with a one-line FormatError naming the problem.
"""

from __future__ import annotations

import math
import os
import struct
import time
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from spark_model import packing, quant
from spark_model.checkpoint import model_from_flat
from spark_model.config import ModelConfig, RopeScaling
from spark_model.formats import gguf as gg
from spark_model.formats.mapping import FormatError
from spark_model.transformer import full_logits

from reference import forward as reference_forward
from reference import llama31_inv_freq

# Head size 8: the llama.cpp row order is then not its own inverse, so reading with the
# permutation applied in the wrong direction would be caught.
BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            d_ff=48, rope_theta=10_000.0, rope_scaling=None, max_seq_len=256,
            norm_eps=1e-5)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


# ---- writing GGUF files the way llama.cpp's converter does -------------------------------

def random_params(cfg: ModelConfig, seed: int, f16_exact: bool = False) -> dict:
    """Random Spark-layout parameters, scaled so attention is far from uniform."""
    rng = np.random.default_rng(seed)
    d, n, k, h, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                        cfg.vocab_size)
    shapes = {"embed": (v, d), "final_norm.scale": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, v)
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        shapes.update({b + "attn_norm.scale": (d,), b + "mlp_norm.scale": (d,),
                       b + "attn.q": (d, n, h), b + "attn.k": (d, k, h), b + "attn.v": (d, k, h),
                       b + "attn.o": (n, h, d), b + "mlp.gate": (d, f), b + "mlp.up": (d, f),
                       b + "mlp.down": (f, d)})
        if cfg.attn_bias:
            shapes.update({b + "attn.q_bias": (n, h), b + "attn.k_bias": (k, h),
                           b + "attn.v_bias": (k, h)})
    out = {}
    for name, shape in shapes.items():
        if name.endswith("scale"):
            x = 1.0 + rng.normal(0, 0.2, shape)
        elif name.endswith("_bias"):
            x = rng.normal(0, 0.5, shape)
        else:
            x = rng.normal(0, 2.0 / math.sqrt(shape[0]), shape)
        x = x.astype(np.float32)
        if f16_exact:  # values a float16 file stores without loss
            x = x.astype(np.float16).astype(np.float32)
        out[name] = x
    return out


def llama_cpp_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of q/k rows, per head: rotate-half row
    j * H/2 + i (j = 0, 1; i < H/2) goes to row 2i + j (pairs become adjacent)."""
    h = w.shape[0] // n_heads
    order = [head * h + j * (h // 2) + i
             for head in range(n_heads) for i in range(h // 2) for j in range(2)]
    return w[np.array(order)]


def gguf_tensors(cfg: ModelConfig, p: dict, permute: bool) -> dict[str, np.ndarray]:
    """Spark-layout parameters -> GGUF-named (out, in) arrays."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = {"token_embd.weight": p["embed"], "output_norm.weight": p["final_norm.scale"]}
    if not cfg.tie_embeddings:
        t["output.weight"] = p["lm_head"].T
    for i in range(cfg.n_layers):
        b, s = f"blk.{i}.", f"blocks.{i}."
        q = p[s + "attn.q"].reshape(d, n * h).T
        kk = p[s + "attn.k"].reshape(d, k * h).T
        t[b + "attn_norm.weight"] = p[s + "attn_norm.scale"]
        t[b + "ffn_norm.weight"] = p[s + "mlp_norm.scale"]
        t[b + "attn_q.weight"] = llama_cpp_row_order(q, n) if permute else q
        t[b + "attn_k.weight"] = llama_cpp_row_order(kk, k) if permute else kk
        t[b + "attn_v.weight"] = p[s + "attn.v"].reshape(d, k * h).T
        t[b + "attn_output.weight"] = p[s + "attn.o"].reshape(n * h, d).T
        if cfg.attn_bias:
            qb, kb = p[s + "attn.q_bias"].reshape(-1), p[s + "attn.k_bias"].reshape(-1)
            t[b + "attn_q.bias"] = llama_cpp_row_order(qb, n) if permute else qb
            t[b + "attn_k.bias"] = llama_cpp_row_order(kb, k) if permute else kb
            t[b + "attn_v.bias"] = p[s + "attn.v_bias"].reshape(-1)
        t[b + "ffn_gate.weight"] = p[s + "mlp.gate"].T
        t[b + "ffn_up.weight"] = p[s + "mlp.up"].T
        t[b + "ffn_down.weight"] = p[s + "mlp.down"].T
    return {name: np.ascontiguousarray(a, np.float32) for name, a in t.items()}


def write_gguf(path: Path, arch: str, cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
               qtype: Q = Q.F32, kv: dict | None = None, drop: tuple = (),
               tokens: bool = True) -> Path:
    """A GGUF file of `tensors`; 2-D tensors stored as `qtype`, 1-D ones as F32.

    kv adds or overrides metadata (value types: int -> uint32, float -> float32, str,
    list); drop names metadata keys to leave out (general.architecture included).
    """
    w = gguf.GGUFWriter(str(path), arch)
    meta = {f"{arch}.block_count": cfg.n_layers, f"{arch}.context_length": cfg.max_seq_len,
            f"{arch}.embedding_length": cfg.d_model, f"{arch}.feed_forward_length": cfg.d_ff,
            f"{arch}.attention.head_count": cfg.n_heads,
            f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
            f"{arch}.rope.dimension_count": cfg.head_dim,
            f"{arch}.rope.freq_base": float(cfg.rope_theta),
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
            "general.name": "tiny test model", "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    if tokens:
        meta["tokenizer.ggml.tokens"] = [f"<t{i}>" for i in range(cfg.vocab_size)]
    meta.update(kv or {})
    for key in drop:
        meta.pop(key, None)
        w.kv_data[0].pop(key, None)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, a in tensors.items():
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif qtype in K_ENCODERS:
            w.add_tensor(name, K_ENCODERS[qtype](a)[0], raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits_close(imported, cfg: ModelConfig, original: dict, atol: float = 1e-4) -> None:
    model = model_from_flat(imported.cfg, imported.params)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, 20)
    ours = np.asarray(full_logits(model, jnp.asarray(tokens[None])))[0]
    ref = reference_forward(original, cfg, tokens)
    assert np.abs(ref).max() > 1.0  # logits far from zero: the comparison means something
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=atol)


# ---- whole models ------------------------------------------------------------------------

@pytest.mark.parametrize("tie, qtype", [(False, Q.F32), (True, Q.F32), (True, Q.F16),
                                        (False, Q.F16)])
def test_llama_round_trip_matches_reference(tmp_path, tie, qtype):
    cfg = config(tie_embeddings=tie)
    p = random_params(cfg, seed=1, f16_exact=qtype == Q.F16)
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, gguf_tensors(cfg, p, permute=True),
                      qtype=qtype)
    imp = gg.read_gguf(path)
    assert imp.cfg == cfg.replace(init_std=imp.cfg.init_std)
    assert imp.source == str(path)
    assert set(imp.params) == set(p)
    for name, a in p.items():  # F32 and f16-exact values come back bit for bit
        assert imp.params[name].dtype == np.float32
        np.testing.assert_array_equal(imp.params[name], a, err_msg=name)
    logits_close(imp, cfg, p)
    kind, tok = imp.tokenizer_source
    assert kind == "gguf" and tok["tokenizer.ggml.tokens"][5] == "<t5>"
    assert tok["tokenizer.ggml.model"] == "gpt2" and tok["tokenizer.ggml.eos_token_id"] == 2
    assert all(k.startswith("tokenizer.") for k in tok)
    assert imp.info["architecture"] == "llama" and imp.info["name"] == "tiny test model"
    n_2d = 4 * cfg.n_layers + 3 * cfg.n_layers + 1 + (0 if tie else 1)
    assert imp.info["tensor_types"] == {qtype.name: n_2d, "F32": 2 * cfg.n_layers + 1} \
        if qtype != Q.F32 else {"F32": len(p)}


def test_qwen2_biases_not_permuted(tmp_path):
    cfg = config(rope_theta=1e6, tie_embeddings=True, attn_bias=True)
    p = random_params(cfg, seed=2)
    path = write_gguf(tmp_path / "q.gguf", "qwen2", cfg, gguf_tensors(cfg, p, permute=False))
    imp = gg.read_gguf(path)
    assert imp.cfg.attn_bias and imp.cfg.rope_theta == 1e6
    assert imp.info["architecture"] == "qwen2"
    logits_close(imp, cfg, p)


def test_llama_biases_are_unpermuted_too(tmp_path):
    cfg = config(tie_embeddings=False, attn_bias=True)
    p = random_params(cfg, seed=3)
    imp = gg.read_gguf(write_gguf(tmp_path / "b.gguf", "llama", cfg,
                                  gguf_tensors(cfg, p, permute=True)))
    logits_close(imp, cfg, p)


def test_permutation_direction_matters(tmp_path):
    """The row order is not an involution at H = 8, so a reader that undid it the wrong
    way round (or not at all) would fail the reference comparison above."""
    rows = np.arange(2 * 8)[:, None].astype(np.float32)
    once = llama_cpp_row_order(rows, 2)
    assert not np.array_equal(llama_cpp_row_order(once, 2), rows)
    np.testing.assert_array_equal(gg.unpermute_rows(once, 2), rows)
    np.testing.assert_array_equal(gg.unpermute_rows(once[:, 0], 2), rows[:, 0])
    # A qwen2-ordered (unpermuted) file read as llama gives different logits.
    cfg = config(tie_embeddings=True)
    p = random_params(cfg, seed=4)
    imp = gg.read_gguf(write_gguf(tmp_path / "w.gguf", "llama", cfg,
                                  gguf_tensors(cfg, p, permute=False)))
    with pytest.raises(AssertionError):
        logits_close(imp, cfg, p)


def test_linear_rope_scaling(tmp_path):
    cfg = config(rope_scaling=RopeScaling(kind="linear", factor=4.0))
    p = random_params(cfg, seed=5)
    t = gguf_tensors(cfg, p, permute=True)
    imp = gg.read_gguf(write_gguf(tmp_path / "l.gguf", "llama", cfg, t, kv={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}))
    assert imp.cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    logits_close(imp, cfg, p)
    # Older files' spelling (deepseek-coder GGUFs): llama.rope.scale_linear.
    old = gg.read_gguf(write_gguf(tmp_path / "o.gguf", "llama", cfg, t,
                                  kv={"llama.rope.scale_linear": 4.0}))
    assert old.cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)


def test_freq_base_defaults_to_10000_only_when_absent(tmp_path):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=6), permute=True)
    imp = gg.read_gguf(write_gguf(tmp_path / "a.gguf", "llama", cfg, t,
                                  drop=("llama.rope.freq_base",)))
    assert imp.cfg.rope_theta == 10_000.0
    imp = gg.read_gguf(write_gguf(tmp_path / "b.gguf", "llama", cfg, t,
                                  kv={"llama.rope.freq_base": 123_456.0}))
    assert imp.cfg.rope_theta == 123_456.0
    # Without vocab_size the tokens list gives the vocabulary; without head_count_kv
    # the format's default (one kv head per query head) applies.
    assert imp.cfg.vocab_size == cfg.vocab_size


def test_llama3_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3.1 scaling as rope_freqs.weight: each frequency's divisor."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=16.0,
                          original_max_position=1024)
    cfg = config(rope_scaling=scaling, head_dim=16, n_heads=2, n_kv_heads=1)
    base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    divisors = base / llama31_inv_freq(cfg.head_dim, cfg.rope_theta, 8.0, 1.0, 16.0, 1024)
    assert 1 < np.sum((divisors > 1.001) & (divisors < 7.99))  # two points in the band
    p = random_params(cfg, seed=8)
    t = gguf_tensors(cfg, p, permute=True)
    t["rope_freqs.weight"] = divisors.astype(np.float32)
    imp = gg.read_gguf(write_gguf(tmp_path / "r.gguf", "llama", cfg, t))
    got = imp.cfg.rope_scaling
    assert got is not None and got.kind == "llama3" and got.factor == pytest.approx(8.0)
    np.testing.assert_allclose(
        llama31_inv_freq(cfg.head_dim, cfg.rope_theta, got.factor, got.low_freq_factor,
                         got.high_freq_factor, got.original_max_position),
        base / divisors, rtol=1e-5)
    logits_close(imp, cfg, p)
    # All-ones divisors are plain RoPE; divisors that follow no Llama 3 rule are refused.
    t["rope_freqs.weight"] = np.ones(cfg.head_dim // 2, np.float32)
    assert gg.read_gguf(write_gguf(tmp_path / "one.gguf", "llama", cfg, t)).cfg \
        .rope_scaling is None
    t["rope_freqs.weight"] = np.array([1, 3, 1, 5, 2, 8, 1, 8], np.float32)
    refused(write_gguf(tmp_path / "bad.gguf", "llama", cfg, t), "rope_freqs.weight")


def test_read_gguf_metadata_gives_plain_python_values(tmp_path):
    cfg = config()
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg,
                      gguf_tensors(cfg, random_params(cfg, seed=9), permute=True),
                      kv={"tokenizer.ggml.scores": [0.5, -1.25], "general.flag": True})
    meta = gg.read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and type(meta["llama.block_count"]) is int
    assert type(meta["llama.rope.freq_base"]) is float
    assert meta["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]
    assert meta["tokenizer.ggml.scores"] == [0.5, -1.25] and meta["general.flag"] is True
    assert not any(k.startswith("GGUF.") for k in meta)
    header = gg.inspect_gguf(path)
    assert header.version == 3 and len(header.tensors) == len(gguf_tensors(
        cfg, random_params(cfg, seed=9), permute=True))
    assert header.kv["tokenizer.ggml.tokens"] == gg.ArrayInfo(8, cfg.vocab_size)


# ---- block types ---------------------------------------------------------------------------

def _f16(b: bytes) -> float:
    return float(np.frombuffer(b, "<f2")[0])


def ref_dequant_q8_0(raw: bytes) -> np.ndarray:
    """Q8_0 block (34 bytes): f16 scale d, then 32 int8 q; x = d * q."""
    out = []
    for o in range(0, len(raw), 34):
        d = _f16(raw[o:o + 2])
        out += [d * q for q in struct.unpack("<32b", raw[o + 2:o + 34])]
    return np.array(out, np.float32)


def ref_dequant_q4_0(raw: bytes) -> np.ndarray:
    """Q4_0 block (18 bytes): f16 d, 16 bytes; element j is byte j's low nibble and
    element j + 16 its high nibble; x = d * (nibble - 8)."""
    out = []
    for o in range(0, len(raw), 18):
        d, qs = _f16(raw[o:o + 2]), raw[o + 2:o + 18]
        out += [d * ((b & 15) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]
    return np.array(out, np.float32)


def ref_dequant_q4_1(raw: bytes) -> np.ndarray:
    """Q4_1 block (20 bytes): f16 d, f16 minimum m, 16 bytes of nibbles as Q4_0;
    x = d * nibble + m."""
    out = []
    for o in range(0, len(raw), 20):
        d, m, qs = _f16(raw[o:o + 2]), _f16(raw[o + 2:o + 4]), raw[o + 4:o + 20]
        out += [d * (b & 15) + m for b in qs] + [d * (b >> 4) + m for b in qs]
    return np.array(out, np.float32)


def _k_superblock_scales(sub_scale, sub_min, levels):
    """6-bit scales and mins of one K super-block and the f16 d, dmin they multiply."""
    d = np.float16(sub_scale.max() / 63)
    dmin = np.float16(sub_min.max() / 63)
    sc = np.clip(np.round(sub_scale / np.float32(d)), 0, 63) if d else np.zeros(8)
    mn = np.clip(np.round(sub_min / np.float32(dmin)), 0, 63) if dmin else np.zeros(8)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8)


def _pack_k_scales(sc, mn) -> bytes:
    """The 12-byte 6-bit scale/min packing of Q4_K and Q5_K: sub-blocks 0-3 keep scale
    and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 keep their low 4 bits
    in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the top
    bits of bytes 0-3 (scale) and 4-7 (min)."""
    b = [0] * 12
    for j in range(4):
        b[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        b[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6)
        b[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    return bytes(b)


def encode_q45_k(x: np.ndarray, bits: int):
    """Rows (n, 256k) -> Q4_K (bits 4) or Q5_K (bits 5) blocks and their exact values.

    Super-block of 256: f16 d, f16 dmin, 12 bytes of scales/mins, [Q5_K: 32 bytes of
    5th bits], 128 bytes of low nibbles; eight sub-blocks of 32, value = d*sc*q - dmin*m.
    Nibbles: byte l of chunk c (32 bytes) holds sub-block 2c's element l (low) and
    sub-block 2c+1's element l (high); Q5_K's 5th bit of sub-block s, element l, is bit s
    of high-bit byte l.
    """
    levels = (1 << bits) - 1
    blocks, values = [], []
    for sup in x.reshape(-1, 256).astype(np.float32):
        sub = sup.reshape(8, 32)
        lo = np.minimum(sub.min(1), 0)
        scale, minimum = (sub.max(1) - lo) / levels, -lo
        d, dmin, sc, mn = _k_superblock_scales(scale, minimum, levels)
        step = np.float32(d) * sc.astype(np.float32)
        off = np.float32(dmin) * mn.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(step[:, None] > 0, np.round((sub + off[:, None]) / step[:, None]), 0)
        q = np.clip(q, 0, levels).astype(np.uint8)
        values.append((step[:, None] * q - off[:, None]).reshape(-1))
        qs = bytearray(128)
        qh = bytearray(32)
        for c in range(4):
            for l in range(32):
                qs[32 * c + l] = (q[2 * c, l] & 15) | ((q[2 * c + 1, l] & 15) << 4)
        for s in range(8):
            for l in range(32):
                qh[l] |= ((int(q[s, l]) >> 4) & 1) << s
        head = np.float16(d).tobytes() + np.float16(dmin).tobytes() + _pack_k_scales(sc, mn)
        blocks.append(head + (bytes(qh) if bits == 5 else b"") + bytes(qs))
    raw = np.frombuffer(b"".join(blocks), np.uint8).reshape(x.shape[0], -1)
    return raw, np.concatenate(values).reshape(x.shape)


def encode_q6_k(x: np.ndarray):
    """Rows (n, 256k) -> Q6_K blocks and their exact values.

    Super-block of 256: 128 bytes of low nibbles (ql), 64 bytes of high 2-bit pairs (qh),
    16 int8 scales (one per 16 values), f16 d; value i = d * scale[i // 16] * (u - 32)
    for the 6-bit u. Value i of half n (128 each), r = i % 128 = 32k + l: its low nibble
    is in ql[64n + l + 32(k % 2)] (low nibble for k < 2, high for k >= 2), its top two
    bits are bits 2k, 2k+1 of qh[32n + l].
    """
    blocks, values = [], []
    for sup in x.reshape(-1, 256).astype(np.float32):
        sub = sup.reshape(16, 16)
        scale = np.abs(sub).max(1) / 31
        d = np.float16(scale.max() / 127)
        sc = np.clip(np.round(scale / np.float32(d)), -128, 127).astype(np.int8) if d \
            else np.zeros(16, np.int8)
        step = np.float32(d) * sc.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(step[:, None] != 0, np.round(sub / step[:, None]), 0)
        q = np.clip(q, -32, 31).astype(np.int32)
        values.append((step[:, None] * q).reshape(-1))
        u = (q.reshape(-1) + 32).astype(np.uint8)
        ql, qh = bytearray(128), bytearray(64)
        for i in range(256):
            n, r = divmod(i, 128)
            k, l = divmod(r, 32)
            ql[64 * n + l + 32 * (k % 2)] |= (u[i] & 15) << (4 * (k // 2))
            qh[32 * n + l] |= (u[i] >> 4) << (2 * k)
        blocks.append(bytes(ql) + bytes(qh) + sc.tobytes() + np.float16(d).tobytes())
    raw = np.frombuffer(b"".join(blocks), np.uint8).reshape(x.shape[0], -1)
    return raw, np.concatenate(values).reshape(x.shape)


K_ENCODERS = {Q.Q4_K: lambda a: encode_q45_k(a, 4), Q.Q5_K: lambda a: encode_q45_k(a, 5),
              Q.Q6_K: encode_q6_k}
# Round-trip error bound as a fraction of the largest |x| (half a quantization step plus
# the scales' own rounding), per type.
TOLERANCE = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 5e-3, Q.Q4_0: 0.13, Q.Q4_1: 7e-2,
             Q.Q5_0: 0.07, Q.Q5_1: 3.5e-2, Q.Q4_K: 0.1, Q.Q5_K: 0.05, Q.Q6_K: 0.03}


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_inverts_the_package_quantizer(qtype):
    x = np.random.default_rng(int(qtype)).normal(0, 1, (6, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    out = gg.dequantize(raw, int(qtype), x.shape)
    assert out.dtype == np.float32 and out.shape == x.shape
    err = np.abs(out - x).max() / np.abs(x).max()
    assert err < TOLERANCE[qtype], err
    assert err > 0 or qtype == Q.F16  # the type really was lossy, i.e. really used
    reference = {Q.Q8_0: ref_dequant_q8_0, Q.Q4_0: ref_dequant_q4_0,
                 Q.Q4_1: ref_dequant_q4_1}.get(qtype)
    if reference is not None:
        np.testing.assert_allclose(out.reshape(-1), reference(raw.tobytes()), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_dequantize_k_quants_against_block_layout(qtype):
    x = np.random.default_rng(int(qtype)).normal(0, 1, (4, 512)).astype(np.float32)
    raw, exact = K_ENCODERS[qtype](x)
    assert raw.shape[1] == 2 * gguf.GGML_QUANT_SIZES[qtype][1]
    out = gg.dequantize(raw, int(qtype), x.shape)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-6)
    err = np.abs(out - x).max() / np.abs(x).max()
    assert err < TOLERANCE[qtype], err


def test_dequantize_refuses_other_types_and_wrong_sizes():
    with pytest.raises(FormatError, match="Q2_K"):
        gg.dequantize(np.zeros(84, np.uint8), int(Q.Q2_K), (256,))
    with pytest.raises(FormatError, match="99"):
        gg.dequantize(np.zeros(4, np.uint8), 99, (1,))
    with pytest.raises(FormatError, match="bytes"):
        gg.dequantize(np.zeros(33, np.uint8), int(Q.Q8_0), (32,))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.Q4_K,
                                   Q.Q5_K, Q.Q6_K])
def test_quantized_files_round_trip(tmp_path, qtype):
    # Rows of 256 so every type (K-quants included) can store every matrix.
    cfg = config(d_model=256, d_ff=256, n_layers=1, head_dim=64, vocab_size=16,
                 tie_embeddings=False)
    p = random_params(cfg, seed=10)
    path = write_gguf(tmp_path / "q.gguf", "llama", cfg, gguf_tensors(cfg, p, permute=True),
                      qtype=qtype)
    imp = gg.read_gguf(path, weights="f32")
    assert imp.info["tensor_types"][qtype.name] == 9  # the 2-D tensors
    for name, a in p.items():
        err = np.abs(imp.params[name] - a).max() / np.abs(a).max()
        assert err < TOLERANCE[qtype], (name, err)
        if a.ndim == 1:  # norms stay F32
            np.testing.assert_array_equal(imp.params[name], a)
    # As stored: Q8_0/Q4_0/Q4_1 matrices stay packed, holding exactly the values the float
    # read gives; other block types become the nearest of those, said so in the info.
    packed = gg.read_gguf(path)
    fmt = gg.NEAREST.get(qtype, "f32")
    assert packing.summary(packed.params) == {fmt: 9, "f32": 3} if fmt != "f32" else \
        packing.summary(packed.params) == {"f32": 12}
    assert packed.info["weights"] == fmt
    for name, a in packed.params.items():
        if packing.is_packed(a) and fmt.upper() == qtype.name:  # the file's own blocks
            np.testing.assert_array_equal(
                packing.unpack(name, a, p[name].shape).view(np.uint32),
                imp.params[name].view(np.uint32))
        elif packing.is_packed(a):  # converted: the nearest format's rounding on top
            err = np.abs(packing.unpack(name, a, p[name].shape) - p[name]).max()
            assert err / np.abs(p[name]).max() < TOLERANCE[qtype] + TOLERANCE[Q[fmt.upper()]]
    converted = {} if fmt in ("f32", qtype.name.lower()) else {f"{qtype.name} -> {fmt}": 9}
    assert packed.info.get("converted", {}) == converted


@pytest.mark.parametrize("want", ["q8_0", "q4_0", "q4_1", "f32"])
def test_gguf_weights_option_converts_or_refuses_widening(tmp_path, want):
    """weights= puts every matrix in one format; a Q4_1 file cannot be widened to q8_0."""
    cfg = config(d_model=64, d_ff=96, n_layers=1, head_dim=16, vocab_size=32)
    p = random_params(cfg, seed=11)
    path = write_gguf(tmp_path / "q.gguf", "llama", cfg, gguf_tensors(cfg, p, permute=True),
                      qtype=Q.Q4_1)
    if want == "q8_0":
        with pytest.raises(FormatError, match=r"already quantized to q4_1; quantizing it to "
                                              r"the wider q8_0") as e:
            gg.read_gguf(path, weights=want)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
        return
    imp = gg.read_gguf(path, weights=want)
    dense = gg.read_gguf(path, weights="f32").params
    assert imp.info["weights"] == want
    for name, a in imp.params.items():
        if want == "f32" or not packing.packable(name):
            np.testing.assert_array_equal(a, dense[name])
        elif want == "q4_1":  # the file's blocks, as they are
            np.testing.assert_array_equal(packing.unpack(name, a, p[name].shape), dense[name])
        else:  # q4_0 from the dequantized q4_1 values: the reference quantizer on them
            ref = packing.pack(name, dense[name], "q4_0")
            np.testing.assert_array_equal(quant.to_gguf_blocks(a), quant.to_gguf_blocks(ref))
    with pytest.raises(FormatError, match=r"unknown weight format 'q3'"):
        gg.read_gguf(path, weights="q3")


# ---- bad input -------------------------------------------------------------------------

def refused(path, *needles: str, reader=None) -> str:
    """read_gguf must raise a one-line FormatError that starts with the path and
    contains every needle."""
    with pytest.raises(FormatError) as e:
        (reader or gg.read_gguf)(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.fixture
def good(tmp_path) -> tuple[Path, ModelConfig, dict]:
    cfg = config(tie_embeddings=False)
    t = gguf_tensors(cfg, random_params(cfg, seed=11), permute=True)
    return write_gguf(tmp_path / "good.gguf", "llama", cfg, t), cfg, t


def _copy(src: Path, name: str, cut: int | None = None) -> Path:
    dst = src.with_name(name)
    data = src.read_bytes()
    dst.write_bytes(data if cut is None else data[:cut])
    return dst


def _patch(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _positions(path: Path, tensor: str) -> dict:
    """Byte positions of one tensor's info fields, found with the gguf package's reader."""
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == tensor)
    at, out = t.field.offset, {}
    for label, part in zip(("name_len", "name", "n_dims", "dims", "type", "offset"),
                           t.field.parts):
        out[label] = at
        at += part.nbytes
    out.update(info_start=t.field.offset, data_start=int(t.data_offset),
               data_end=int(t.data_offset) + int(t.n_bytes),
               kv_start=r.fields["llama.block_count"].offset, alignment=int(r.alignment),
               rel=int(t.data_offset) - int(r.data_offset))
    return out


def test_the_good_file_reads(good):
    path, cfg, _ = good
    assert gg.read_gguf(path).cfg.n_layers == cfg.n_layers


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    refused(path, "empty")


def test_missing_file_and_directory(tmp_path):
    refused(tmp_path / "nope.gguf", "no such file")
    refused(tmp_path, "not a regular file")


def test_wrong_magic(good):
    path = _copy(good[0], "magic.gguf")
    _patch(path, 0, b"GGML")
    refused(path, "not a GGUF file", "b'GGML'")
    text = good[0].with_name("text.gguf")
    text.write_text("hello")
    refused(text, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 65539])
def test_unsupported_version(good, version):
    path = _copy(good[0], "v.gguf")
    _patch(path, 4, struct.pack("<I", version))
    refused(path, f"GGUF version {version} is not supported")


def test_big_endian_file_is_named(good):
    path = _copy(good[0], "be.gguf")
    _patch(path, 4, struct.pack(">I", 3))
    refused(path, "big-endian")


def test_truncated_everywhere(good):
    src = good[0]
    pos = _positions(src, "blk.1.ffn_down.weight")
    last = gguf.GGUFReader(str(src)).tensors[-1]
    cases = {"header": (10, "truncated in the header"),
             "kv": (pos["kv_start"] + 5, "truncated or damaged"),
             "info": (pos["info_start"] + 10, "truncated in the tensor infos"),
             "data": (int(last.data_offset) + int(last.n_bytes) - 1,
                      f"tensor {last.name}'s data")}
    for label, (cut, needle) in cases.items():
        msg = refused(_copy(src, f"cut-{label}.gguf", cut), needle)
        if label == "data":
            assert "runs past the end of the file" in msg


def test_string_length_past_the_end_of_the_metadata(good):
    """A metadata string whose declared length runs past the end is truncation in the
    metadata, found by the header walk before anything reads it."""
    path = _copy(good[0], "strlen.gguf")
    r = gguf.GGUFReader(str(path))
    field = r.fields["general.name"]
    at = field.offset + sum(part.nbytes for part in field.parts[:3])  # key len, key, type
    del r
    _patch(path, at, struct.pack("<Q", 10**9))
    refused(path, "truncated in the metadata", "general.name", "1000000000 bytes")


def test_absurd_key_length_is_refused_without_reading_it(good):
    path = _copy(good[0], "keylen.gguf")
    r = gguf.GGUFReader(str(path))
    at = r.fields["llama.block_count"].offset
    del r
    _patch(path, at, struct.pack("<Q", 2**40))
    refused(path, "a metadata key", "claims 1099511627776 bytes")


def test_counts_larger_than_the_file(good):
    path = _copy(good[0], "kvcount.gguf")
    _patch(path, 16, struct.pack("<Q", 2**40))
    refused(path, "truncated or damaged", "declares 1099511627776 metadata key/value pairs")
    path = _copy(good[0], "tcount.gguf")
    _patch(path, 8, struct.pack("<Q", 2**62))
    refused(path, "tensors, more than")


def test_unknown_architecture_is_named(tmp_path):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=12), permute=True)
    refused(write_gguf(tmp_path / "g.gguf", "gpt2", cfg, t), "architecture gpt2",
            "not supported")
    refused(write_gguf(tmp_path / "n.gguf", "llama", cfg, t, drop=("general.architecture",)),
            "general.architecture is missing")


def test_unknown_tensor_type_is_named_with_the_tensor(good):
    path = _copy(good[0], "type.gguf")
    _patch(path, _positions(path, "blk.0.attn_q.weight")["type"], struct.pack("<I", 99))
    refused(path, "blk.0.attn_q.weight", "unknown tensor type id 99")
    # A known type this reader does not take (I32 has F32's size, so the file is intact).
    path = _copy(good[0], "i32.gguf")
    _patch(path, _positions(path, "blk.0.attn_q.weight")["type"], struct.pack("<I", Q.I32))
    refused(path, "blk.0.attn_q.weight", "type I32", "not supported")


def test_tensor_data_past_the_end(good):
    path = _copy(good[0], "offset.gguf")
    pos = _positions(path, "blk.0.ffn_up.weight")
    _patch(path, pos["offset"], struct.pack("<Q", pos["alignment"] * 10**6))
    refused(path, "blk.0.ffn_up.weight", "runs past the end of the file")
    path = _copy(good[0], "dims.gguf")  # a dimension grown beyond the file
    _patch(path, pos["dims"] + 8, struct.pack("<Q", 10**9))
    refused(path, "blk.0.ffn_up.weight", "runs past the end of the file")


def test_dimension_product_overflowing_int64(good):
    path = _copy(good[0], "overflow.gguf")
    pos = _positions(path, "blk.0.ffn_up.weight")
    _patch(path, pos["dims"], struct.pack("<QQ", 2**32, 2**32))
    refused(path, "blk.0.ffn_up.weight", "overflows int64")


def test_more_memory_than_available_is_refused_before_dequantizing(good, monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("dequantized before the memory check")

    monkeypatch.setattr(gg, "dequantize", must_not_run)
    monkeypatch.setattr(gg, "available_memory", lambda: 5_000)  # below one tensor
    refused(good[0], "needs 7.62 KiB in float32", "4.88 KiB of memory available")
    monkeypatch.setattr(gg, "available_memory", lambda: 60_000)  # each tensor fits, not all
    refused(good[0], "reading needs about", "available")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux /proc only")
def test_available_memory_is_read_from_the_system():
    with open("/proc/meminfo") as f:  # Linux: MemAvailable, within what other work moves
        expected = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    assert abs(gg.available_memory() - expected) < 0.2 * expected


def test_missing_tokenizer_metadata_is_named(tmp_path):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=13), permute=True)
    refused(write_gguf(tmp_path / "t.gguf", "llama", cfg, t, tokens=False),
            "tokenizer.ggml.tokens is missing")
    refused(write_gguf(tmp_path / "big.gguf", "llama", cfg, t,
                       kv={"llama.vocab_size": cfg.vocab_size - 1}),
            "more than the model's vocabulary")


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length",
                                 "llama.feed_forward_length", "llama.attention.head_count",
                                 "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_missing_architecture_key_is_named(tmp_path, key):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=14), permute=True)
    refused(write_gguf(tmp_path / "k.gguf", "llama", cfg, t, drop=(key,)), f"{key} is missing")


def test_bad_architecture_values_are_named(tmp_path):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=15), permute=True)
    refused(write_gguf(tmp_path / "s.gguf", "llama", cfg, t, kv={"llama.block_count": "two"}),
            "llama.block_count must be a positive integer")
    # A damaged layer count is refused before any per-layer bookkeeping is built.
    refused(write_gguf(tmp_path / "c.gguf", "llama", cfg, t, kv={"llama.block_count": 2**31}),
            "llama.block_count is 2147483648, more layers than the file has tensors")
    refused(write_gguf(tmp_path / "3.gguf", "llama", cfg, t, kv={"llama.block_count": 3}),
            "tensor blk.2.attn_norm.weight is missing")
    refused(write_gguf(tmp_path / "h.gguf", "llama", cfg, t,
                       kv={"llama.attention.head_count_kv": 3}), "n_heads (4)")
    refused(write_gguf(tmp_path / "y.gguf", "llama", cfg, t,
                       kv={"llama.rope.scaling.type": "yarn"}), "'yarn'")
    refused(write_gguf(tmp_path / "e.gguf", "llama", cfg, t, kv={"llama.expert_count": 8}),
            "mixture-of-experts")
    refused(write_gguf(tmp_path / "sp.gguf", "llama", cfg, t, kv={"split.count": 3}),
            "part of a split GGUF (3 files)")
    refused(write_gguf(tmp_path / "p.gguf", "llama", cfg, t,
                       kv={"llama.rope.dimension_count": 4, "llama.attention.key_length": 8}),
            "partial rotary")


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    cfg = config(tie_embeddings=False)
    t = gguf_tensors(cfg, random_params(cfg, seed=16), permute=True)
    missing = {k: v for k, v in t.items() if k != "blk.1.ffn_up.weight"}
    refused(write_gguf(tmp_path / "m.gguf", "llama", cfg, missing),
            "tensor blk.1.ffn_up.weight is missing")
    wrong = {**t, "blk.0.ffn_gate.weight": np.zeros((cfg.d_ff + 1, cfg.d_model), np.float32)}
    refused(write_gguf(tmp_path / "w.gguf", "llama", cfg, wrong),
            "tensor blk.0.ffn_gate.weight has shape (49, 32)", "(48, 32)")
    extra = {**t, "blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)}
    refused(write_gguf(tmp_path / "x.gguf", "llama", cfg, extra),
            "unexpected tensor blk.0.ffn_gate_exps.weight")
    deep = {**t, "blk.2.attn_norm.weight": np.ones(cfg.d_model, np.float32)}
    refused(write_gguf(tmp_path / "d.gguf", "llama", cfg, deep),
            "unexpected tensor blk.2.attn_norm.weight")


def test_non_finite_values_are_named(tmp_path):
    cfg = config()
    t = gguf_tensors(cfg, random_params(cfg, seed=17), permute=True)
    t["blk.1.attn_v.weight"] = t["blk.1.attn_v.weight"].copy()
    t["blk.1.attn_v.weight"][3, 4] = np.nan
    refused(write_gguf(tmp_path / "nan.gguf", "llama", cfg, t), "blk.1.attn_v.weight",
            "non-finite")


def test_gguf_package_failures_become_format_errors(good, monkeypatch):
    def broken(*a, **k):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(gguf, "GGUFReader", broken)
    refused(good[0], "gguf package cannot read it", "IndexError")
    refused(good[0], "gguf package cannot read it", reader=gg.read_gguf_metadata)


def test_random_damage_gives_format_errors_only(good, tmp_path):
    """Cut or corrupted headers: each read succeeds (harmless bytes such as a name's
    letters) or raises a one-line FormatError; nothing else escapes."""
    data = good[0].read_bytes()
    header_end = gguf.GGUFReader(str(good[0])).data_offset
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        damaged = bytearray(data)
        if i % 3 == 0:
            damaged = damaged[:int(rng.integers(len(data)))]
        else:
            for at in rng.integers(0, header_end, int(rng.integers(1, 5))):
                damaged[at] = int(rng.integers(256))
        path = tmp_path / "damaged.gguf"
        path.write_bytes(bytes(damaged))
        try:
            gg.read_gguf(path)
            outcomes["ok"] += 1
        except FormatError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


def test_the_users_file_is_not_changed(good):
    path = good[0]
    before = path.read_bytes()
    gg.read_gguf(path)
    gg.read_gguf_metadata(path)
    assert path.read_bytes() == before


# ---- the real SmolLM2 file -----------------------------------------------------------------

SMOLLM2 = Path(os.environ.get(
    "SPARK_SMOLLM2_GGUF",
    "~/.cache/spark/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).expanduser()

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n):
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True
'''


def greedy_ids(text: str, tokens: list[str]) -> list[int]:
    """Token ids of ASCII `text` by longest match over the byte-level vocabulary (space
    is shown as U+0120, newline as U+010A in byte-level BPE pieces): a valid, if not
    the tokenizer's own, segmentation."""
    text = text.replace(" ", "\u0120").replace("\n", "\u010a")
    index = {t: i for i, t in enumerate(tokens)}
    longest = max(map(len, tokens))
    ids, at = [], 0
    while at < len(text):
        for size in range(min(longest, len(text) - at), 0, -1):
            if text[at:at + size] in index:
                ids.append(index[text[at:at + size]])
                at += size
                break
        else:
            raise AssertionError(f"no piece for {text[at]!r}")
    return ids


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"no SmolLM2 GGUF at {SMOLLM2} "
                    "(set SPARK_SMOLLM2_GGUF)")
def test_smollm2_gguf_matches_reference_and_predicts_code():
    from spark_model.bpe import BPETokenizer
    from train.corpus import validation_files

    start = time.perf_counter()
    imp = gg.read_gguf(SMOLLM2, weights="f32")  # the float64 reference needs floats
    seconds = time.perf_counter() - start
    cfg = imp.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
            cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.tie_embeddings and not cfg.attn_bias and cfg.rope_scaling is None
    assert cfg.rope_theta == 100_000.0 and cfg.max_seq_len == 8192
    # 1,024 tokens of held-out standard-library code through the file's own tokenizer.
    tok = BPETokenizer.from_gguf_metadata(imp.tokenizer_source[1])
    text = max(sorted(validation_files()), key=lambda f: f.stat().st_size).read_text("utf-8")
    ids = np.array(tok.encode(text)[:1024])
    assert len(ids) == 1024
    model = model_from_flat(cfg, imp.params)
    ours = np.asarray(full_logits(model, jnp.asarray(ids[None])))[0]
    ref = reference_forward(imp.params, cfg, ids)
    diff = float(np.abs(ours - ref).max())
    # The next-token argmax of a working code model often follows real Python; with q/k
    # rows left in llama.cpp's order it rarely does (measured on these 1,024 tokens: 0.42
    # against 0.11).
    hits = float(np.mean(ref[:-1].argmax(-1) == ids[1:]))
    print(f"\nSmolLM2 GGUF: read in {seconds:.1f} s; max |logit diff| vs float64 reference "
          f"{diff:.2e} over 1,024 positions (logit range {np.abs(ref).max():.1f}); "
          f"next-token top-1 {hits:.2f}")
    assert diff < 1e-3 * max(1.0, float(np.abs(ref).max()))
    assert hits > 0.3
