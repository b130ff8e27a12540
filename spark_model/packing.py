"""Which of a model's parameters may be packed (spark_model/quant.py), and converting them.

A packed weight is always a (N out, K in) matrix, the orientation its product and the GGUF
file use. Spark's float parameters are stored input-first, so each packable parameter has a
fixed way to and from that matrix (axis letters as in config.ModelConfig):

  blocks.{i}.attn.q      (D, N, H)  <->  (N*H, D)
  blocks.{i}.attn.k, .v  (D, K, H)  <->  (K*H, D)
  blocks.{i}.attn.o      (N, H, D)  <->  (D, N*H)
  blocks.{i}.mlp.gate, .up  (D, F)  <->  (F, D)
  blocks.{i}.mlp.down       (F, D)  <->  (D, F)
  embed                     (V, D)  <->  (V, D)   rows are tokens: the lookup gathers rows,
                                                 the tied output projection is (V out, D in)
  lm_head                   (D, V)  <->  (V, D)

Norm scales and biases always stay float32. A matrix whose input dimension is not a multiple
of 32 cannot be packed and stays float32 (`convert` says so in its notes).

The weight formats a user names: "f32" (every parameter float32) or one of quant.FORMATS.
Requantizing a packed tensor to a *wider* format (more bytes per weight: q4_0 < q4_1 < q8_0)
is refused: it would cost memory and speed and give back none of the precision lost.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from spark_model import quant
from spark_model.quant import PackedWeight, QuantError

F32 = "f32"
WEIGHT_FORMATS = (F32, *quant.FORMATS)  # what `weights=` / `--to` accept

_PACKABLE = re.compile(r"(embed|lm_head|blocks\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down)))")


def packable(name: str) -> bool:
    """Whether parameter `name` is a weight matrix that may be packed."""
    return _PACKABLE.fullmatch(name) is not None


def is_packed(value: Any) -> bool:
    return isinstance(value, PackedWeight)


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(N, K) of the packed form of parameter `name` whose Spark shape is `shape`."""
    kind = _kind(name)
    if kind in ("q", "k", "v"):
        d, n, h = shape
        return n * h, d
    if kind == "o":
        n, h, d = shape
        return d, n * h
    if kind == "embed":
        return tuple(shape)  # type: ignore[return-value]
    a, b = shape  # gate, up, down, lm_head: (in, out)
    return b, a


def to_matrix(name: str, w: np.ndarray) -> np.ndarray:
    """A Spark-layout float parameter as its (N out, K in) matrix (NumPy)."""
    w = np.asarray(w)
    kind = _kind(name)
    if kind in ("q", "k", "v"):
        return w.reshape(w.shape[0], -1).T
    if kind == "o":
        return w.reshape(-1, w.shape[-1]).T
    if kind == "embed":
        return w
    return w.T


def from_matrix(name: str, mat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`to_matrix`'s inverse: the (N, K) matrix back in the Spark layout `shape`."""
    kind = _kind(name)
    if kind in ("q", "k", "v"):
        return np.ascontiguousarray(mat.T.reshape(shape))
    if kind == "o":
        return np.ascontiguousarray(mat.T.reshape(shape))
    if kind == "embed":
        return np.ascontiguousarray(mat.reshape(shape))
    return np.ascontiguousarray(mat.T)


def format_of(value: Any) -> str:
    """"f32" for a float array, else the packed weight's format."""
    return value.fmt if is_packed(value) else F32


def check_weight_format(fmt: Any) -> str:
    """`fmt` if it names a weight format, else a one-line QuantError listing them."""
    if fmt not in WEIGHT_FORMATS:
        raise QuantError(f"unknown weight format {fmt!r} (expected one of "
                         f"{', '.join(WEIGHT_FORMATS)})")
    return fmt


def check_not_wider(name: str, stored: str, target: str) -> None:
    """Refuse requantizing a tensor packed as `stored` into the wider format `target`."""
    if stored in quant.FORMATS and target in quant.FORMATS and \
            quant.FORMATS[target].bytes_per_weight > quant.FORMATS[stored].bytes_per_weight:
        raise QuantError(f"tensor {name!r} is already quantized to {stored}; quantizing it to "
                         f"the wider {target} would not restore the precision lost (load it "
                         f"as {stored}, or start from the float model)")


def pack(name: str, w: Any, fmt: str) -> PackedWeight:
    """The float parameter `w` (Spark layout) packed in `fmt` (NumPy arrays)."""
    return quant.quantize(to_matrix(name, np.asarray(w, np.float32)), fmt, name=name)


def unpack(name: str, w: PackedWeight, shape: tuple[int, ...]) -> np.ndarray:
    """The packed parameter as a float32 array in its Spark layout `shape`."""
    return from_matrix(name, quant.dequantize(w), shape)


def convert_one(name: str, value: Any, shape: tuple[int, ...], fmt: str | None,
                notes: list[str] | None = None) -> Any:
    """One parameter in weight format `fmt` (None: as it is).

    "f32" dequantizes a packed tensor. A packed format quantizes a float matrix, keeps one
    already in `fmt` as it is (bit for bit), requantizes one packed in a wider format
    through float32, and refuses one packed in a narrower format. Parameters that cannot be
    packed stay float32 (a weight matrix whose K is not a multiple of 32 is noted in
    `notes`).
    """
    if fmt is None:
        return value
    stored = format_of(value)
    if fmt == F32:
        return unpack(name, value, shape) if stored != F32 else value
    if not packable(name):
        return value
    if stored == fmt:
        return value
    check_not_wider(name, stored, fmt)
    _, k_n = matrix_shape(name, shape)
    if k_n % quant.BLOCK:
        if notes is not None:
            notes.append(f"{name} stays f32: its input dimension {k_n} is not a multiple of "
                         f"{quant.BLOCK}")
        return value if stored == F32 else unpack(name, value, shape)
    dense = unpack(name, value, shape) if stored != F32 else value
    return pack(name, dense, fmt)


def convert(flat: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], fmt: str | None,
            notes: list[str] | None = None) -> dict[str, Any]:
    """Every parameter of a flat dict in weight format `fmt` (see `convert_one`).

    `shapes` gives each parameter's Spark shape (a packed value carries only its matrix's).
    Tensors are converted one at a time, so at most one extra float32 copy exists at once.
    """
    if fmt is not None:
        check_weight_format(fmt)
        for name, value in flat.items():  # refuse before converting anything
            if packable(name) and fmt != F32:
                check_not_wider(name, format_of(value), fmt)
    return {name: convert_one(name, value, tuple(shapes[name]), fmt, notes)
            for name, value in flat.items()}


def summary(flat: Mapping[str, Any]) -> dict[str, int]:
    """Tensors per weight format, e.g. {"q4_1": 210, "q8_0": 1, "f32": 61}."""
    out: dict[str, int] = {}
    for value in flat.values():
        out[format_of(value)] = out.get(format_of(value), 0) + 1
    return out


def weights_label(flat: Mapping[str, Any]) -> str:
    """The matrices' format in one word: "f32", "q4_1", or "mixed (q4_1, q8_0)"."""
    fmts = sorted({format_of(v) for n, v in flat.items() if packable(n)})
    return fmts[0] if len(fmts) == 1 else f"mixed ({', '.join(fmts)})" if fmts else F32


def param_bytes(flat: Mapping[str, Any]) -> int:
    """Bytes of every parameter as stored (packed quants and scales, or the float array)."""
    return sum(v.nbytes if is_packed(v) else int(np.asarray(v).nbytes) for v in flat.values())


def map_arrays(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` applied to a float array, or to each array of a packed weight."""
    if is_packed(value):
        return PackedWeight(value.fmt, fn(value.qs), fn(value.d),
                            None if value.m is None else fn(value.m))
    return fn(value)


def permute_rows(w: PackedWeight, order: np.ndarray) -> PackedWeight:
    """The packed matrix with its rows (outputs) reordered: row i becomes row order[i].

    Each row holds whole blocks, so a row permutation moves bytes and never requantizes.
    The result has the row layout.
    """
    w = quant.deinterleave(w)
    return PackedWeight(w.fmt, np.ascontiguousarray(np.asarray(w.qs)[order]),
                        np.ascontiguousarray(np.asarray(w.d)[order]),
                        None if w.m is None else np.ascontiguousarray(np.asarray(w.m)[order]))


def convert_model(model: Any, fmt: str | None, notes: list[str] | None = None) -> Any:
    """The Transformer with its parameters in weight format `fmt` (None: as it is)."""
    if fmt is None:
        return model
    from spark_model.checkpoint import flat_params, model_from_flat, param_shapes

    flat = convert(flat_params(model), param_shapes(model.cfg), fmt, notes)
    return model_from_flat(model.cfg, flat)


def interleave_model(model: Any) -> Any:
    """The Transformer with each packed matrix whose N is a multiple of 16 in the interleaved
    layout the decode kernel reads fastest (`quant.interleave`; the same bytes), the others
    as they are. Saving and exporting write the row layout again."""
    from spark_model.checkpoint import flat_params, model_from_flat

    def wanted(v: Any) -> bool:
        return is_packed(v) and not v.interleaved and v.shape[0] % quant.GROUP == 0

    flat = flat_params(model)
    if not any(wanted(v) for v in flat.values()):
        return model
    return model_from_flat(model.cfg, {k: quant.interleave(v) if wanted(v) else v
                                       for k, v in flat.items()})
