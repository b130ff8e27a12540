"""Packed block-quantized weights (GGUF Q8_0, Q4_0, Q4_1) and their pure-JAX product.

A decode step reads every weight once per token, so its time is the bytes of weights read.
These formats keep 32 consecutive weights of a row (a block) as small integers plus a
float16 scale d (and, for q4_1, a float16 minimum m):

  q8_0  w = d * q        q int8                 34 bytes / 32 weights in a GGUF file
  q4_0  w = d * (q - 8)  q 4-bit, 0..15          18 bytes / 32 weights
  q4_1  w = d * q + m    q 4-bit, 0..15          20 bytes / 32 weights

In a GGUF block of a 4-bit format, byte j (0..15) holds weight j in its low nibble and weight
j + 16 in its high nibble. `PackedWeight` keeps a (N out, K in) matrix as three arrays,
split out of the blocks at load (the bytes are the same, only grouped by field):

  qs  q8_0: (N, K) int8; q4_0 / q4_1: (N, K/2) uint8, each block's 16 bytes in GGUF order
  d   (N, K/32) float16 scales
  m   (N, K/32) float16 minimums (q4_1), else None

so a product reads, per weight, 1 + 2/32 = 1.0625 bytes (q8_0), 0.5 + 2/32 = 0.5625 (q4_0)
or 0.5 + 4/32 = 0.625 (q4_1) — the GGUF sizes, and what a bandwidth roofline counts
(`bytes_per_weight`). f32 reads 4.

For the decode kernel, `interleave` regroups the same bytes of a matrix whose N is a multiple
of 16 into groups of 16 rows, so that one vector instruction reads 4 bytes of the same block
of each of 16 rows (spark_model/kernels/packed_args.h):

  qs  (N/16, K/32, C, 16, 4): chunk t of (group g, block b) holds bytes 4t .. 4t+3 of the
      block of each row of the group (C = 8 chunks of a q8_0 block, 4 of a 4-bit one)
  d   (N/16, K/32, 16), m likewise

`PackedWeight.interleaved` tells the layouts apart (by qs's rank); `deinterleave` is the
inverse, and everything that reads or writes blocks (`dequantize`, `to_gguf_blocks`,
`take_rows`) accepts both. Files and checkpoints always hold the row layout.

`quantize` reproduces ggml's reference quantizer bit for bit (the `gguf` package's Python
port is the reference): q8_0 rounds half away from zero with d = amax/127; q4_0 takes the
signed value of largest magnitude (first on ties) as -8 d and truncates q*1/d + 8.5;
q4_1 spans [min, max] with d = (max - min)/15 and truncates (w - min)/d + 0.5. The scale used
to round is the float32 d; the stored one is d rounded to float16, as in ggml.
`dequantize` gives the reference float32 values bit for bit.

`packed_linear` is the XLA product (dequantize, then dot), used wherever the native kernel
(spark_model/kernels/qmatvec.cc, via `kernels.packed_linear`) is not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # weights per block, every format
GROUP = 16  # rows per group of the interleaved layout


class QuantError(ValueError):
    """Packed weights that cannot be built or used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One block format: its name, GGML type id and sizes."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_bytes: int  # bytes of one 32-weight block in a GGUF file
    bits: int  # bits per quant (8 or 4)
    has_min: bool  # q4_1 carries a float16 minimum per block
    offset: int  # w = d * (q - offset) (+ m): 8 for q4_0, else 0

    @property
    def bytes_per_weight(self) -> float:
        """Bytes read per weight by a product (quants plus scales, and minimums)."""
        return self.block_bytes / BLOCK


FORMATS: dict[str, QuantFormat] = {
    "q8_0": QuantFormat("q8_0", 8, 34, 8, False, 0),
    "q4_0": QuantFormat("q4_0", 2, 18, 4, False, 8),
    "q4_1": QuantFormat("q4_1", 3, 20, 4, True, 0),
}


def get_format(fmt: str) -> QuantFormat:
    """The format named `fmt`, or a one-line error listing the known ones."""
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise QuantError(f"unknown quantization format {fmt!r} (expected one of "
                         f"{', '.join(FORMATS)})") from None


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _check_shape(shape: Any, name: str | None) -> tuple[int, int]:
    try:
        n_n, k_n = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise QuantError(f"{_label(name)}: packed weights must be 2-D (N out, K in), "
                         f"got shape {shape!r}") from None
    if n_n <= 0 or k_n <= 0 or k_n % BLOCK:
        raise QuantError(f"{_label(name)}: shape ({n_n}, {k_n}) cannot be packed: the input "
                         f"dimension K must be a positive multiple of {BLOCK}")
    return n_n, k_n


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A (N, K) weight matrix in a block format; a JAX pytree (`fmt` is static).

    The arrays may be NumPy or JAX arrays; see the module docstring for their layout.
    """

    fmt: str
    qs: Any  # q8_0: (N, K) int8; q4_*: (N, K/2) uint8 (or `interleaved`: module docstring)
    d: Any  # (N, K/32) float16
    m: Any = None  # (N, K/32) float16, q4_1 only

    @property
    def interleaved(self) -> bool:
        """Whether the arrays hold the interleaved layout (groups of 16 rows), not rows."""
        return len(self.qs.shape) == 5

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): the shape of the dense matrix."""
        if self.interleaved:
            groups, nb = self.qs.shape[:2]
            return groups * GROUP, nb * BLOCK
        n_n, cols = self.qs.shape
        return n_n, cols * 8 // FORMATS[self.fmt].bits

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: quants, scales and minimums."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.qs, self.d, self.m) if a is not None)

    def tree_flatten(self):
        return (self.qs, self.d, self.m), self.fmt

    @classmethod
    def tree_unflatten(cls, fmt, children):
        return cls(fmt, *children)


def _check_scales(fmt: QuantFormat, d: np.ndarray, m: np.ndarray | None,
                  name: str | None) -> None:
    for field, arr in (("scale", d), ("minimum", m)):
        if arr is None:
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            n, b = np.argwhere(bad)[0]
            raise QuantError(f"{_label(name)}: {fmt.name} block {field} at row {n}, block {b} "
                             f"is {arr[n, b]} (not finite)")


def from_gguf_blocks(raw: np.ndarray, fmt: str, shape: Any, *,
                     name: str | None = None) -> PackedWeight:
    """The packed weight held by GGUF block bytes `raw` (uint8, as read from the file).

    `shape` is the dense (N, K), i.e. GGUF's dims reversed. Refuses a wrong byte count and
    scales or minimums that are NaN or infinite, naming the tensor when `name` is given.
    """
    f = get_format(fmt)
    n_n, k_n = _check_shape(shape, name)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise QuantError(f"{_label(name)}: {f.name} block data must be uint8 bytes, "
                         f"got {raw.dtype}")
    nb = k_n // BLOCK
    want = n_n * nb * f.block_bytes
    if raw.size != want:
        raise QuantError(f"{_label(name)}: {f.name} data for shape ({n_n}, {k_n}) must be "
                         f"{want} bytes, got {raw.size}")
    blocks = raw.reshape(n_n, nb, f.block_bytes)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if f.has_min else None
    _check_scales(f, d, m, name)
    start = 4 if f.has_min else 2
    qs = np.ascontiguousarray(blocks[..., start:]).reshape(n_n, -1)
    if f.bits == 8:
        qs = qs.view(np.int8)
    return PackedWeight(f.name, qs, d, m)


def interleave(w: PackedWeight) -> PackedWeight:
    """`w` in the interleaved layout (module docstring): the same bytes, regrouped (NumPy).

    N must be a multiple of 16; an interleaved weight comes back as it is.
    """
    if w.interleaved:
        return w
    f = get_format(w.fmt)
    n_n, k_n = w.shape
    if n_n % GROUP:
        raise QuantError(f"interleave: {n_n} rows are not a multiple of {GROUP}")
    g, nb = n_n // GROUP, k_n // BLOCK
    c = BLOCK * f.bits // 8 // 4  # 4-byte chunks of a block's quants: 8 (q8_0) or 4
    qs = np.asarray(w.qs).reshape(g, GROUP, nb, c, 4).transpose(0, 2, 3, 1, 4)

    def scales(a):
        return None if a is None else np.ascontiguousarray(
            np.asarray(a).reshape(g, GROUP, nb).transpose(0, 2, 1))
    return PackedWeight(w.fmt, np.ascontiguousarray(qs), scales(w.d), scales(w.m))


def deinterleave(w: PackedWeight, xp: Any = np) -> PackedWeight:
    """`w` in the row layout (`interleave`'s inverse); `xp` is numpy or jax.numpy."""
    if not w.interleaved:
        return w
    n_n, k_n = w.shape
    nb = k_n // BLOCK
    qs = xp.transpose(w.qs, (0, 3, 1, 2, 4)).reshape(n_n, -1)

    def scales(a):
        return None if a is None else xp.transpose(a, (0, 2, 1)).reshape(n_n, nb)
    return PackedWeight(w.fmt, qs, scales(w.d), scales(w.m))


def take_rows(w: PackedWeight, ids: jax.Array) -> PackedWeight:
    """Rows `ids` (a 1-D integer array) of `w`, in the row layout (traceable): how an
    embedding lookup reads a packed table."""
    if not w.interleaved:
        return jax.tree.map(lambda a: jnp.take(jnp.asarray(a), ids, axis=0), w)
    g, j = ids // GROUP, ids % GROUP
    qs = jnp.asarray(w.qs)[g, :, :, j, :].reshape(ids.shape[0], -1)  # (n, nb, C, 4)

    def scales(a):
        return None if a is None else jnp.asarray(a)[g, :, j]
    return PackedWeight(w.fmt, qs, scales(w.d), scales(w.m))


def to_gguf_blocks(w: PackedWeight) -> np.ndarray:
    """The GGUF block bytes of `w`: (N, K/32 * block_bytes) uint8 (`from_gguf_blocks`'s inverse)."""
    w = deinterleave(w)
    f = get_format(w.fmt)
    n_n, k_n = w.shape
    nb = k_n // BLOCK
    parts = [np.asarray(w.d, np.float16).reshape(n_n, nb, 1).view(np.uint8)]
    if f.has_min:
        parts.append(np.asarray(w.m, np.float16).reshape(n_n, nb, 1).view(np.uint8))
    parts.append(np.asarray(w.qs).view(np.uint8).reshape(n_n, nb, -1))
    return np.concatenate(parts, axis=-1).reshape(n_n, -1)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's roundf), exactly in float32."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 -> (..., 16) bytes: byte j = q[j] | q[j + 16] << 4."""
    return q[..., :16] | (q[..., 16:] << np.uint8(4))


def quantize(w: Any, fmt: str, *, name: str | None = None) -> PackedWeight:
    """A (N, K) float matrix in block format `fmt`, as ggml's reference quantizer does it.

    Refuses weights that are not finite, and blocks whose scale or minimum does not fit a
    float16 (the file format's), naming the tensor when `name` is given.
    """
    f = get_format(fmt)
    w = np.asarray(w)
    n_n, k_n = _check_shape(w.shape, name)
    blocks = w.astype(np.float32).reshape(n_n, k_n // BLOCK, BLOCK)
    if not np.isfinite(blocks).all():
        raise QuantError(f"{_label(name)}: cannot quantize weights that are NaN or infinite")
    m16 = None
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if f.name == "q8_0":
            d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = _round_half_away(blocks * inv).astype(np.int8)
        elif f.name == "q4_0":
            at = np.abs(blocks).argmax(axis=-1)[..., None]  # first of the largest magnitude
            d = np.take_along_axis(blocks, at, axis=-1) / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.clip(np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8), 0, 15)
        else:  # q4_1
            lo = blocks.min(axis=-1, keepdims=True)
            d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.clip(np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8), 0, 15)
            m16 = lo[..., 0].astype(np.float16)
        d16 = d[..., 0].astype(np.float16)
    for field, arr in (("scale", d16), ("minimum", m16)):
        if arr is not None and not np.isfinite(arr).all():
            n, b = np.argwhere(~np.isfinite(arr))[0]
            raise QuantError(f"{_label(name)}: {f.name} block {field} at row {n}, block {b} "
                             f"overflows float16 (weights too large for this format)")
    qs = q.reshape(n_n, k_n) if f.bits == 8 else _pack_nibbles(q).reshape(n_n, k_n // 2)
    return PackedWeight(f.name, qs, d16, m16)


def _unpack_nibbles(qs: Any, n_n: int, k_n: int, xp: Any) -> Any:
    """(N, K/2) GGUF-ordered bytes -> (N, K/32, 32) values 0..15."""
    b = qs.reshape(n_n, k_n // BLOCK, BLOCK // 2)
    return xp.concatenate([b & 0x0F, b >> 4], axis=-1)


def _dequantize(w: PackedWeight, xp: Any) -> Any:
    w = deinterleave(w, xp)
    f = get_format(w.fmt)
    n_n, k_n = w.shape
    d = w.d.astype(xp.float32)[..., None]
    if f.bits == 8:
        q = w.qs.reshape(n_n, k_n // BLOCK, BLOCK).astype(xp.float32)
        out = q * d
    else:
        q = _unpack_nibbles(w.qs, n_n, k_n, xp)
        if f.has_min:
            out = d * q.astype(xp.float32) + w.m.astype(xp.float32)[..., None]
        else:
            out = d * (q.astype(xp.int8) - xp.int8(f.offset)).astype(xp.float32)
    return out.reshape(n_n, k_n)


def dequantize(w: PackedWeight) -> np.ndarray:
    """The (N, K) float32 matrix `w` holds, as the GGUF reference dequantizes it (NumPy)."""
    w = PackedWeight(w.fmt, np.asarray(w.qs), np.asarray(w.d),
                     None if w.m is None else np.asarray(w.m))
    return _dequantize(w, np)


def dequantize_jnp(w: PackedWeight) -> jax.Array:
    """`dequantize` as JAX operations (traceable); equal to it up to float32 rounding of q4_1's
    d*q + m where XLA fuses it into one multiply-add."""
    w = jax.tree.map(jnp.asarray, w)
    return _dequantize(w, jnp)


def packed_linear(x_mk: jax.Array, w: PackedWeight) -> jax.Array:
    """x (M, K) @ dequantize(w).T -> (M, N) float32: the XLA product (jittable).

    It expands the weight to float32 and then runs one dot, so it reads more bytes than the
    native kernel; it runs where that kernel does not (other backends, SPARK_KERNELS=0, more
    than 8 rows).
    """
    if x_mk.ndim != 2 or x_mk.shape[1] != w.shape[1]:
        raise QuantError(f"packed_linear: x must be (M, {w.shape[1]}) for a {w.fmt} weight of "
                         f"shape {w.shape}, got {tuple(x_mk.shape)}")
    return jnp.einsum("mk,nk->mn", x_mk.astype(jnp.float32), dequantize_jnp(w))
