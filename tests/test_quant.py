"""Packed block weights (spark_model/quant.py) against the `gguf` package's reference
quantizer, and the native packed products (kernels/qmatvec.cc for decode rows,
kernels/qmatmul.cc on AMX tiles for many rows) and the XLA fallback against a float64 NumPy
dequantize-and-dot."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_model import kernels, quant

FMTS = list(quant.FORMATS)
U = 2.0 ** -24  # float32 unit roundoff
TINY = 2.0 ** -126  # smallest normal float32: XLA flushes smaller values to zero


def _flush_floor(w64: np.ndarray) -> np.ndarray:
    """(N,) the most that flushing subnormal inputs, products and scales to zero can change
    one output: a few smallest normals per weight, and per weight magnitude."""
    return 4 * TINY * (np.abs(w64).sum(1) + w64.shape[1])


def _gguf_type(fmt: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[fmt.upper()]


def _weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows at very different magnitudes, an all-zero block, a constant block, ties of
    magnitude (+a and -a in one block) and one-sided blocks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= rng.choice([1e-4, 0.02, 1.0, 300.0], size=(n, 1)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = 0.75
    w[2, :32] = rng.uniform(-1, 1, 32)
    w[2, 5], w[2, 9] = 2.0, -2.0  # q4_0 picks the first of equal magnitudes
    w[3, :32] = np.abs(w[3, :32]) + 1.0
    w[4, :32] = -np.abs(w[4, :32]) - 1.0
    return w


def test_formats_are_the_gguf_ones():
    for fmt, f in quant.FORMATS.items():
        t = _gguf_type(fmt)
        assert f.ggml_type == int(t)
        assert (quant.BLOCK, f.block_bytes) == gguf.GGML_QUANT_SIZES[t]
    assert [quant.FORMATS[f].bytes_per_weight for f in FMTS] == [1.0625, 0.5625, 0.625]


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_and_dequantize_match_gguf_bit_for_bit(fmt):
    w = _weights(40, 192)
    ref = gguf.quants.quantize(w, _gguf_type(fmt))
    ours = quant.quantize(w, fmt)
    np.testing.assert_array_equal(quant.to_gguf_blocks(ours), ref)
    want = gguf.quants.dequantize(ref, _gguf_type(fmt))
    np.testing.assert_array_equal(quant.dequantize(ours).view(np.uint32), want.view(np.uint32))
    # The XLA path: the same values, up to one rounding where q4_1's d*q + m is fused.
    np.testing.assert_array_max_ulp(np.asarray(jax.jit(quant.dequantize_jnp)(ours)), want, 1)
    assert ours.nbytes == ref.size  # the bytes a product reads are the file's


@pytest.mark.parametrize("fmt", FMTS)
def test_from_gguf_blocks_dequantizes_like_gguf(fmt):
    w = _weights(24, 96, seed=1)
    raw = gguf.quants.quantize(w, _gguf_type(fmt))
    packed = quant.from_gguf_blocks(raw, fmt, w.shape, name="blk.0.ffn_up.weight")
    want = gguf.quants.dequantize(raw, _gguf_type(fmt))
    np.testing.assert_array_equal(quant.dequantize(packed).view(np.uint32),
                                  want.view(np.uint32))
    np.testing.assert_array_equal(quant.to_gguf_blocks(packed), raw)


def _random_packed(fmt: str, n: int, k: int, seed: int) -> quant.PackedWeight:
    """Random GGUF blocks: random quants, scales from float16's smallest subnormal to its
    largest finite value, some all-zero blocks (scale 0) and minimums of both signs."""
    f = quant.FORMATS[fmt]
    rng = np.random.default_rng(seed)
    nb = n * k // quant.BLOCK
    raw = rng.integers(0, 256, size=(nb, f.block_bytes), dtype=np.uint8)
    scales = np.array([6e-8, 1e-4, 0.01, 0.5, 3.0, 1e3, 65504.0], np.float16)
    d = rng.choice(scales, nb) * rng.choice(np.array([1, -1], np.float16), nb)
    raw[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    if f.has_min:
        m = rng.choice(scales, nb) * rng.choice(np.array([1, -1], np.float16), nb)
        raw[:, 2:4] = m.astype(np.float16).reshape(-1, 1).view(np.uint8)
    zero = rng.random(nb) < 0.1
    raw[zero] = 0
    return quant.from_gguf_blocks(raw.reshape(n, -1), fmt, (n, k))


def _activations(m: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x *= rng.choice([1e-3, 1.0, 20.0], size=(m, 1)).astype(np.float32)
    x[:, :32] *= np.float32(1e-35)  # a block below the kernel's amax floor
    if m > 2:
        x[1] = 0.0
        x[2, 32:] *= np.float32(1e4)
    return x


def _blocks(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1, quant.BLOCK)


def _float_bound(x64: np.ndarray, w64: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """float32 rounding of the kernel's per-block terms and their sums: a few units of
    roundoff per block over the sum of the terms' magnitudes (the quants' part, d q, and the
    minimum's part, m times the block's activation sum)."""
    nb = x64.shape[1] // quant.BLOCK
    shifted = np.abs(_blocks(w64) - mins[..., None]).reshape(w64.shape)
    mag = np.abs(x64) @ shifted.T + np.abs(_blocks(x64)).sum(-1) @ np.abs(mins).T
    return (nb + 40) * 4 * U * mag + _flush_floor(w64)


def _kernel_bound(x64, w64, mins):
    """|y - exact|: activations are rounded per block to d_x q with d_x = amax/127, so each
    element is off by at most d_x/2 = amax/254 (amax floored at 1e-30); every term of the
    product, q4_1's minimum included, uses the rounded activations."""
    amax = np.maximum(np.abs(_blocks(x64)).max(-1), 1e-30)  # (M, K/32)
    spread = np.abs(_blocks(w64)).sum(-1)  # (N, K/32)
    return amax / 254 * 1.0001 @ spread.T + _float_bound(x64, w64, mins)


def _amx_bound(x64: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """|y - exact| for qmatmul.cc: x rounded to bfloat16 (relative error 2^-8), w to a sum
    of two (2^-16), products exact and summed in float32, subnormals flushed."""
    k = x64.shape[1]
    return ((2.0 ** -8 + 2.0 ** -15 + k * U) * (np.abs(x64) @ np.abs(w64).T)
            + _flush_floor(w64))


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest even), as float64."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return u.view(np.float32).astype(np.float64)


def _emulated(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in float64: x rounded per block (half to even) as it does,
    times the weights."""
    xb = _blocks(x)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(1e-30))
    q = np.clip(np.rint(xb * (np.float32(127) / amax)), -127, 127)
    xhat = (q * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)
    return xhat @ w64.T


@pytest.mark.parametrize("fmt", FMTS)
def test_interleaved_layout_holds_the_same_blocks(fmt):
    """quant.interleave regroups the bytes of 16 rows (what a loaded model holds for the
    decode kernel): the same dense matrix, the same GGUF blocks, rows taken for an
    embedding lookup alike, and deinterleave gives the arrays back."""
    packed = _random_packed(fmt, 48, 96, seed=12)
    inter = quant.interleave(packed)
    assert inter.interleaved and not packed.interleaved
    assert inter.shape == packed.shape == (48, 96) and inter.nbytes == packed.nbytes
    assert inter.qs.shape == (3, 3, 8 if fmt == "q8_0" else 4, 16, 4)
    np.testing.assert_array_equal(quant.dequantize(inter), quant.dequantize(packed))
    np.testing.assert_array_equal(quant.to_gguf_blocks(inter), quant.to_gguf_blocks(packed))
    back = quant.deinterleave(inter)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(packed)):
        np.testing.assert_array_equal(a, b)
    assert quant.interleave(inter) is inter
    ids = jnp.asarray([47, 0, 16, 5, 5, 31])
    for w in (packed, inter):
        rows = quant.dequantize_jnp(quant.take_rows(jax.tree.map(jnp.asarray, w), ids))
        np.testing.assert_array_max_ulp(np.asarray(rows),
                                        quant.dequantize(packed)[np.asarray(ids)], 1)
    jit_inter = jax.tree.map(jnp.asarray, inter)  # the XLA fallback reads it too
    x = jnp.asarray(_activations(3, 96, seed=13))
    np.testing.assert_array_equal(
        np.asarray(quant.packed_linear(x, jit_inter)),
        np.asarray(quant.packed_linear(x, jax.tree.map(jnp.asarray, packed))))
    with pytest.raises(quant.QuantError, match="40 rows are not a multiple of 16"):
        quant.interleave(_random_packed(fmt, 40, 32, seed=1))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,k,layout", [(37, 32, "rows"), (1001, 64, "rows"),
                                        (300, 96, "rows"), (37, 4096, "rows"),
                                        (48, 32, "interleaved"), (1008, 64, "interleaved"),
                                        (32, 4096, "interleaved")])
def test_packed_product_kernel_fallback_and_float64_agree(fmt, n, k, layout):
    packed = _random_packed(fmt, n, k, seed=k + n)
    if layout == "interleaved":  # the reference below reads the rows; the kernel these
        packed = quant.interleave(packed)
    w64 = quant.dequantize(packed).astype(np.float64)
    rows = quant.deinterleave(packed)
    mins = (np.asarray(rows.m, np.float64) if rows.m is not None
            else np.zeros((n, k // quant.BLOCK)))
    x = _activations(8, k, seed=k)
    x64 = x.astype(np.float64)
    exact = x64 @ w64.T
    pj = jax.tree.map(jnp.asarray, packed)

    # XLA fallback: float32 dequantization is exact here, so only the dot's rounding.
    fallback = np.asarray(jax.jit(quant.packed_linear)(jnp.asarray(x), pj))
    gamma = k * U * (np.abs(x64) @ np.abs(w64).T) + _flush_floor(w64)
    assert (np.abs(fallback - exact) <= gamma).all()

    if not kernels.usable(jnp.asarray(x)):
        pytest.skip(kernels.status())
    run = jax.jit(kernels.packed_linear)
    native = {m: np.asarray(run(jnp.asarray(x[:m]), pj)) for m in range(1, 9)}
    assert (np.abs(native[8] - exact) <= _kernel_bound(x64, w64, mins)).all()
    assert (np.abs(native[8] - _emulated(x, w64)) <= _float_bound(x64, w64, mins)).all()
    for m in range(1, 9):  # row i of an m-row call is the 1-row call on that row, bitwise
        for i in range(m):
            one = np.asarray(run(jnp.asarray(x[i:i + 1]), pj))[0]
            np.testing.assert_array_equal(native[m][i].view(np.uint32), one.view(np.uint32))
    if packed.interleaved:  # a short prompt's rows stay on qmatvec.cc, in passes of 8
        many = np.concatenate([x] * 5 + [x[:3]])  # 43 rows
        assert "spark_qmatvec" in jax.jit(kernels.packed_linear).lower(
            jnp.asarray(many), pj).as_text()
        got = np.asarray(run(jnp.asarray(many), pj))
        for i in range(len(many)):
            np.testing.assert_array_equal(got[i].view(np.uint32),
                                          native[8][i % 8].view(np.uint32))


@pytest.mark.parametrize("fmt", FMTS)
def test_quantized_real_weights_product(fmt):
    """Weights quantized by `quantize` (not random bytes): the kernel's result stays within
    its bound of the float64 product, and `SPARK_KERNELS`-off tracing takes the fallback."""
    w = _weights(200, 576, seed=3)
    packed = jax.tree.map(jnp.asarray, quant.quantize(w, fmt))
    x = _activations(3, 576, seed=4)
    w64 = quant.dequantize(packed).astype(np.float64)
    mins = (np.asarray(packed.m, np.float64) if packed.m is not None
            else np.zeros((200, 576 // quant.BLOCK)))
    got = np.asarray(jax.jit(kernels.packed_linear)(jnp.asarray(x), packed))
    x64 = x.astype(np.float64)
    assert (np.abs(got - x64 @ w64.T) <= _kernel_bound(x64, w64, mins)).all()
    with kernels.disabled():  # traced inside (a fresh function): the XLA product
        off = np.asarray(jax.jit(lambda a, b: kernels.packed_linear(a, b))(jnp.asarray(x),
                                                                          packed))
    np.testing.assert_array_equal(off, np.asarray(quant.packed_linear(jnp.asarray(x), packed)))
    many = _activations(9, 576, seed=5)  # more rows than qmatvec.cc takes
    m64 = many.astype(np.float64)
    gamma = (_amx_bound(m64, w64) if kernels.amx_usable()
             else 576 * U * (np.abs(m64) @ np.abs(w64).T) + _flush_floor(w64))
    got = np.asarray(kernels.packed_linear(jnp.asarray(many), packed))
    assert (np.abs(got - m64 @ w64.T) <= gamma).all()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(9, 37, 32), (33, 304, 96), (100, 64, 4096), (64, 1001, 64)])
def test_many_row_product_on_amx_tiles(fmt, m, n, k, monkeypatch):
    """qmatmul.cc (rows past 8, where the CPU has AMX) on random blocks with extreme scales
    and zero blocks, ragged in rows and columns: within its bound of the float64 product,
    within float32 summation of its own bfloat16 roundings emulated in float64, and
    SPARK_AMX=0 takes the float32 expansion instead."""
    if not kernels.amx_usable():
        pytest.skip("no AMX here: " + kernels.status())
    packed = _random_packed(fmt, n, k, seed=m + n + k)
    pj = jax.tree.map(jnp.asarray, packed)
    w64 = quant.dequantize(packed).astype(np.float64)
    x = np.concatenate([_activations(8, k, seed=k), _activations(m - 8, k, seed=k + 1)])
    x64 = x.astype(np.float64)
    got = np.asarray(jax.jit(kernels.packed_linear)(jnp.asarray(x), pj))
    assert (np.abs(got - x64 @ w64.T) <= _amx_bound(x64, w64)).all()
    if n % 16 == 0:  # the interleaved layout expands to the same tiles (where it takes
        # them: up to QMATVEC_ROWS rows it stays on qmatvec.cc)
        inter = jax.tree.map(jnp.asarray, quant.interleave(packed))
        monkeypatch.setattr(kernels, "QMATVEC_ROWS", kernels.MAX_ROWS)
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda a, b: kernels.packed_linear(a, b))(jnp.asarray(x),
                                                                         inter)), got)
        monkeypatch.undo()
    w32 = w64.astype(np.float32)
    hi = _bf16(w32)
    xr, wr = _bf16(x), hi + _bf16((w32 - hi).astype(np.float32))
    summed = k * U * (np.abs(xr) @ np.abs(wr).T) + _flush_floor(w64)
    assert (np.abs(got - xr @ wr.T) <= summed).all()
    monkeypatch.setenv("SPARK_AMX", "0")  # read at tracing: a fresh function
    off = np.asarray(jax.jit(lambda a, b: kernels.packed_linear(a, b))(jnp.asarray(x), pj))
    gamma = k * U * (np.abs(x64) @ np.abs(w64).T) + _flush_floor(w64)
    assert (np.abs(off - x64 @ w64.T) <= gamma).all()
    assert not np.array_equal(off, got)


def test_weights_sharing_x_in_one_call_match_separate_calls():
    """packed_linear_many: several weights (formats mixed, shapes differing) give bitwise the
    results of one call each, at every row count."""
    if not kernels.usable(jnp.zeros((1,), jnp.float32)):
        pytest.skip(kernels.status())
    rng = np.random.default_rng(7)
    ws = [jax.tree.map(jnp.asarray, quant.quantize(
        rng.standard_normal((n, 96)).astype(np.float32), fmt))
        for n, fmt in [(40, "q4_1"), (7, "q8_0"), (130, "q4_1"), (1, "q4_1"), (33, "q4_0"),
                       (48, "q4_1"), (32, "q8_0")]]
    ws[5:] = [quant.interleave(w) for w in ws[5:]]  # layouts mixed too
    x = _activations(8, 96, seed=8)
    many = jax.jit(kernels.packed_linear_many)
    one = jax.jit(kernels.packed_linear)
    for m in (1, 3, 8):
        got = many(jnp.asarray(x[:m]), ws)
        for y, w in zip(got, ws):
            want = one(jnp.asarray(x[:m]), w)
            np.testing.assert_array_equal(np.asarray(y).view(np.uint32),
                                          np.asarray(want).view(np.uint32))
    text = jax.jit(kernels.packed_linear_many).lower(jnp.asarray(x[:1]), ws).as_text()
    assert text.count("spark_qmatvec") == 5  # one call per format and layout


def test_bad_inputs_get_one_line_errors():
    raw = gguf.quants.quantize(_weights(8, 64), gguf.GGMLQuantizationType.Q4_1)
    name = "blk.3.attn_q.weight"

    def refuses(match, fn, *args, **kw):
        with pytest.raises(quant.QuantError, match=match) as e:
            fn(*args, **kw)
        assert "\n" not in str(e.value)

    refuses(r"'blk.3.attn_q.weight'.*must be 320 bytes, got 319",
            quant.from_gguf_blocks, raw.reshape(-1)[:-1], "q4_1", (8, 64), name=name)
    nan = raw.copy()
    nan[2, 20:22] = np.array([np.nan], np.float16).view(np.uint8)  # row 2, block 1: d
    refuses(r"'blk.3.attn_q.weight'.*scale at row 2, block 1 is nan",
            quant.from_gguf_blocks, nan, "q4_1", (8, 64), name=name)
    inf = raw.copy()
    inf[1, 2:4] = np.array([-np.inf], np.float16).view(np.uint8)  # row 1, block 0: m
    refuses(r"minimum at row 1, block 0 is -inf", quant.from_gguf_blocks, inf, "q4_1", (8, 64),
            name=name)
    refuses(r"unknown quantization format 'q5_0' \(expected one of q8_0, q4_0, q4_1\)",
            quant.from_gguf_blocks, raw, "q5_0", (8, 64))
    refuses(r"unknown quantization format 'Q8'", quant.quantize, np.zeros((2, 32)), "Q8")
    refuses(r"must be uint8", quant.from_gguf_blocks, raw.astype(np.int16), "q4_1", (8, 64))
    refuses(r"'w'.*shape \(4, 48\).*multiple of 32", quant.quantize, np.zeros((4, 48)), "q8_0",
            name="w")
    refuses(r"must be 2-D", quant.quantize, np.zeros(64), "q8_0")
    bad = np.ones((2, 64), np.float32)
    bad[1, 3] = np.nan
    refuses(r"'w'.*NaN or infinite", quant.quantize, bad, "q4_0", name="w")
    refuses(r"'w'.*q8_0 block scale at row 0, block 1 overflows float16", quant.quantize,
            np.concatenate([np.ones((1, 32)), np.full((1, 32), 1e7)], 1), "q8_0", name="w")
    packed = quant.quantize(np.ones((2, 64), np.float32), "q8_0")
    refuses(r"x must be \(M, 64\)", kernels.packed_linear, jnp.zeros((1, 32)), packed)


@pytest.mark.parametrize("fmt", FMTS)
def test_native_dequantize_gives_the_reference_values(fmt, monkeypatch):
    """kernels.dequantize (the prefill's expansion without AMX) against the gguf package's
    values: q8_0 and q4_0 bit for bit, q4_1's d*q + m within one unit in the last place; and
    a many-row product through it within a float32 dot's rounding of the float64 one."""
    monkeypatch.setenv("SPARK_AMX", "0")
    if not kernels.usable(jnp.zeros((1,), jnp.float32)):
        pytest.skip(kernels.status())
    packed = _random_packed(fmt, 37, 4096, seed=9)  # extreme scales, zero blocks
    want = gguf.quants.dequantize(quant.to_gguf_blocks(packed), _gguf_type(fmt))
    pj = jax.tree.map(jnp.asarray, packed)
    got = np.asarray(jax.jit(kernels.dequantize)(pj))
    if fmt == "q4_1":
        np.testing.assert_array_max_ulp(got, want, 1)
    else:
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    inter = quant.interleave(_random_packed(fmt, 48, 4096, seed=9))  # the other layout
    np.testing.assert_array_equal(
        np.asarray(jax.jit(kernels.dequantize)(jax.tree.map(jnp.asarray, inter))),
        np.asarray(jax.jit(kernels.dequantize)(
            jax.tree.map(jnp.asarray, quant.deinterleave(inter)))))
    w = _weights(300, 96, seed=10)
    pw = jax.tree.map(jnp.asarray, quant.quantize(w, fmt))
    w64 = quant.dequantize(pw).astype(np.float64)
    x = _activations(40, 96, seed=11)  # more rows than the decode kernel takes
    x64 = x.astype(np.float64)
    text = jax.jit(kernels.packed_linear).lower(jnp.asarray(x), pw).as_text()
    assert "spark_dequantize" in text and "spark_qmatvec" not in text
    y = np.asarray(jax.jit(kernels.packed_linear)(jnp.asarray(x), pw))
    gamma = 96 * U * (np.abs(x64) @ np.abs(w64).T) * 1.01 + _flush_floor(w64)
    assert (np.abs(y - x64 @ w64.T) <= gamma).all()
