"""A small, validating reader and writer for the safetensors format, on NumPy memory maps.

The format: an 8-byte little-endian unsigned header length N, then N bytes of JSON mapping
each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
the byte after the header; an optional "__metadata__" entry maps strings to strings), then
the raw little-endian tensor data.

This module exists because the `safetensors` package's NumPy API cannot read bfloat16 (NumPy
has no such dtype), and most published checkpoints are bfloat16. Every header field is
checked against the file's size before any tensor is touched, so a truncated or damaged
file is reported by name instead of failing inside a read or allocating garbage sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from spark_model.formats.mapping import FormatError

# Bytes per element of every dtype the format defines; only READABLE ones can be loaded.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
READABLE = ("F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # A header beyond 100 MiB is damage, not a model (the format's own cap).


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry; begin/end are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one file: where each tensor lies, nothing read yet."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: {what}")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check `path`'s header against the file size; reads no tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated safetensors file ({size} bytes): it cannot even hold "
                              "the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _fail(path, f"header length {n} runs past the end of the file ({size} bytes; "
                              "truncated or not a safetensors file)")
        if n > MAX_HEADER:
            raise _fail(path, f"header length {n} is over the format's {MAX_HEADER}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"safetensors header must be a JSON object, got "
                          f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "safetensors __metadata__ must be a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {name: _entry(path, name, spec, data_start, data_len)
               for name, spec in header.items()}
    # Overlapping tensors would alias each other's bytes: a damaged or hostile header.
    prev: TensorEntry | None = None
    for t in sorted((t for t in tensors.values() if t.end > t.begin), key=lambda t: t.begin):
        if prev is not None and t.begin < prev.end:
            raise _fail(path, f"tensors {prev.name} and {t.name} overlap in the data")
        prev = t
    return SafetensorsHeader(path, tensors, metadata)


def _entry(path: Path, name: str, spec: object, data_start: int, data_len: int) -> TensorEntry:
    """One header entry, checked: known dtype, shape of naturals, offsets that fit it."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise _fail(path, f"tensor {name}: header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in ITEMSIZE:
        raise _fail(path, f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise _fail(path, f"tensor {name}: shape {shape!r} is not a list of non-negative "
                          "integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_natural(o) for o in offsets) or offsets[0] > offsets[1]):
        raise _fail(path, f"tensor {name}: data_offsets {offsets!r} are not [begin, end] "
                          "with 0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise _fail(path, f"tensor {name}: data_offsets end {end} is past the end of the data "
                          f"({data_len} bytes; truncated file?)")
    need = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != need:
        raise _fail(path, f"tensor {name}: data_offsets hold {end - begin} bytes but {dtype} "
                          f"{tuple(shape)} needs {need}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _natural(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: they are the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


class SafetensorsReader:
    """Tensors of one validated file, decoded to float32 on request from a memory map."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._map: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        """A fresh float32 array (never a view of the file) of tensor `name`."""
        t = self.header.tensors[name]
        if t.dtype not in READABLE:
            raise _fail(self.header.path, f"tensor {name} is stored as {t.dtype}; readable "
                                          f"dtypes are {', '.join(READABLE)}")
        if t.numel == 0:
            return np.zeros(t.shape, np.float32)
        if self._map is None:
            self._map = np.memmap(self.header.path, dtype=np.uint8, mode="r")
        raw = self._map[t.begin:t.end]
        if t.dtype == "BF16":
            out = bf16_bits_to_f32(raw.view("<u2"))
        else:
            out = raw.view("<f4" if t.dtype == "F32" else "<f2").astype(np.float32)
        return out.reshape(t.shape)

    def close(self) -> None:
        self._map = None


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      dtype: str = "F32", metadata: Mapping[str, str] | None = None) -> None:
    """Write float `tensors` as one safetensors file of `dtype` (F32, F16 or BF16).

    Writes to a temporary sibling and renames it into place, so a failed write never
    leaves a half-written file under `path`.
    """
    if dtype not in READABLE:
        raise ValueError(f"dtype must be one of {READABLE}, got {dtype!r}")
    blobs, header, offset = [], {}, 0
    for name, value in tensors.items():
        x = np.asarray(value, np.float32)
        if dtype == "BF16":
            data = f32_to_bf16_bits(x).astype("<u2").tobytes()
        else:
            data = x.astype("<f4" if dtype == "F32" else "<f2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(x.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # Pad so the data starts 8-byte aligned.
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
