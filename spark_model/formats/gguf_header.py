"""The bounds-checked walk over a GGUF file's header, and its metadata as plain values.

    header = inspect_gguf("model.gguf")      # checked header, no tensor data read
    meta = read_gguf_metadata("model.gguf")  # every key -> str, int, float, bool or a list

A GGUF file is a header (magic b"GGUF", version, tensor and key/value counts), typed
key/value metadata, one info record per tensor (name, dimensions, type, data offset) and
the aligned tensor data. `inspect_gguf` walks everything before the data with its own
bounds-checked parser (`_Cursor`) and never reads tensor data: wrong magic, unsupported
versions, truncation anywhere, counts and lengths larger than the file, unknown tensor
types, dimension products that overflow and tensors whose data would run past the end of
the file are all refused here, by name, before anything is allocated. (The `gguf`
package's reader trusts the file: on a cut one it fails with NumPy's "cannot reshape
array" and the like.) Only a file that passed is handed to that reader (`_reader`), whose
metadata `_plain_metadata` turns into plain Python values.

Kept apart from `formats.gguf`, which turns a validated file into a Spark model, so the
file-format layer can be read (and reused, e.g. by `eval/bench_import.py`) on its own.
Every problem is a one-line `FormatError` that starts with the file's path.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any

import gguf as gguflib
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from spark_model.formats.mapping import FormatError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # Version 1 had 32-bit lengths; 3 added big-endian files.
HEADER_BYTES = 24  # magic u32, version u32, tensor count u64, key/value count u64
DEFAULT_ALIGNMENT = 32  # Used when general.alignment is absent (the format's default).
MAX_DIMS = 4  # GGML tensors have at most four dimensions.
MAX_NAME_BYTES = 65_535  # The format's limit on key lengths (tensor names are far shorter).
INT64_MAX = 2**63 - 1

# GGUF value types -> (struct format, size); 8 is a string, 9 an array.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4),
            5: ("<i", 4), 6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8),
            12: ("<d", 8)}
_UINT32 = 4
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


def _show(text: str) -> str:
    """A name from the file, safe to put in a one-line message."""
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type id {ggml_type}"


# ---- the header ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """An array value as the header walk records it (elements are not decoded)."""

    elem_type: int
    length: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's info record, with its absolute data position in the file."""

    name: str
    ggml_type: int
    ne: tuple[int, ...]  # GGUF order: ne[0] is the fastest-varying (row) dimension.
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    n_elements: int

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy shape: ne reversed (a (out, in) matrix is stored as ne = [in, out])."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data, checked against the file's size.

    kv holds scalar values decoded (strings as str, numbers as int/float/bool) and
    arrays as ArrayInfo (their elements are walked, not decoded).
    """

    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int
    kv: dict[str, Any]
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; `where` names the section."""

    def __init__(self, buf: Any, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.where = "header"

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.path}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated in the {self.where}: {what} at byte {self.pos} needs "
                            f"{n} bytes, the file ends at byte {self.size}")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} at byte {self.pos - 8} claims {n} bytes, more than "
                            f"the format's {limit}")
        self.need(n, f"{what} ({n} bytes)")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def string(self, what: str, limit: int | None = None) -> str:
        raw = self.raw_string(what, limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8: {raw[:40]!r}") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        self.pos += n

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """Read (scalars, strings) or walk (arrays) one value of type `vtype`."""
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.scalar(fmt, size, f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype != _ARRAY:
            raise self.fail(f"metadata key {key} has unknown value type {vtype}")
        if depth > 4:
            raise self.fail(f"metadata key {key} nests arrays more than 4 deep")
        elem = self.u32(f"the element type of {key}")
        length = self.u64(f"the length of {key}")
        if elem in _SCALARS:
            size = _SCALARS[elem][1]
            self.need(length * size, f"{key}'s {length} elements")
            self.pos += length * size
        elif elem == _STRING:
            self.need(length * 8, f"{key}'s {length} strings")  # each has an 8-byte length
            for i in range(length):
                self.skip_string(f"element {i} of {key}")
        elif elem == _ARRAY:
            self.need(length * 12, f"{key}'s {length} arrays")  # each: type u32 + length u64
            for _ in range(length):
                self.value(_ARRAY, key, depth + 1)
        else:
            raise self.fail(f"metadata key {key} is an array of unknown value type {elem}")
        return ArrayInfo(elem, length)


def _file_size(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read it ({e.strerror})") from None
    if not os.path.isfile(path):
        raise FormatError(f"{path}: not a regular file")
    return st.st_size


def inspect_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Validate a GGUF file's header against its size without reading tensor data.

    Cheap (one pass over the metadata, no tensor bytes touched) and strict: any damage a
    later read would trip over is a FormatError naming what and where.
    """
    path = os.fspath(path)
    size = _file_size(path)
    if size == 0:
        raise FormatError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if head[:4] != MAGIC[:len(head[:4])]:  # a short file may still be a cut GGUF
            raise FormatError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, "
                              f"GGUF files start with {MAGIC!r})")
        if size < HEADER_BYTES:
            raise FormatError(f"{path}: truncated in the header: the file has {size} bytes, "
                              f"the GGUF header alone has {HEADER_BYTES}")
        version = struct.unpack_from("<I", head, 4)[0]
        if version & 0xFFFF == 0 and version != 0:
            raise FormatError(f"{path}: a big-endian GGUF file (version field "
                              f"{version:#010x}); only little-endian files are supported")
        if version not in SUPPORTED_VERSIONS:
            raise FormatError(f"{path}: GGUF version {version} is not supported "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        room = size - HEADER_BYTES
        if n_kv > room // _MIN_KV_BYTES:
            raise FormatError(f"{path}: truncated or damaged: the header declares {n_kv} "
                              f"metadata key/value pairs, more than a file of {size} bytes "
                              f"can hold")
        if n_tensors > room // _MIN_TENSOR_INFO_BYTES:
            raise FormatError(f"{path}: truncated or damaged: the header declares "
                              f"{n_tensors} tensors, more than a file of {size} bytes can "
                              f"hold")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, size, path)
            cur.pos = HEADER_BYTES
            kv = _walk_metadata(cur, n_kv)
            infos = _walk_tensor_infos(cur, n_tensors)
            header_end = cur.pos
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in kv:
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise FormatError(f"{path}: general.alignment must be a power of two, "
                              f"got {alignment!r}")
    data_offset = -(-header_end // alignment) * alignment
    tensors = []
    for name, ggml_type, ne, rel, nbytes, n_elements in infos:
        if rel % alignment:
            raise FormatError(f"{path}: tensor {_show(name)}'s data offset {rel} is not a "
                              f"multiple of the alignment {alignment}")
        start = data_offset + rel
        if start + nbytes > size:
            raise FormatError(f"{path}: tensor {_show(name)}'s data (bytes {start} to "
                              f"{start + nbytes}) runs past the end of the file ({size} "
                              f"bytes): the file is truncated or damaged")
        tensors.append(TensorInfo(name, ggml_type, ne, start, nbytes, n_elements))
    return GGUFHeader(path, size, version, alignment, data_offset, kv, tuple(tensors))


def _walk_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        cur.where = f"metadata (key/value pair {i + 1} of {n_kv})"
        key = cur.string("a metadata key", MAX_NAME_BYTES)
        if key in kv:
            raise cur.fail(f"metadata key {_show(key)} appears twice")
        cur.where = f"metadata (key {_show(key)}, pair {i + 1} of {n_kv})"
        vtype = cur.u32(f"the value type of {_show(key)}")
        kv[key] = cur.value(vtype, _show(key))
    return kv


def _walk_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple]:
    infos, seen = [], set()
    for i in range(n_tensors):
        cur.where = f"tensor infos (tensor {i + 1} of {n_tensors})"
        name = cur.string("a tensor name", MAX_NAME_BYTES)
        shown = _show(name)
        if name in seen:
            raise cur.fail(f"tensor {shown} appears twice")
        seen.add(name)
        cur.where = f"tensor infos (tensor {shown}, {i + 1} of {n_tensors})"
        n_dims = cur.u32(f"the dimension count of {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {shown} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(cur.u64(f"dimension {d} of {shown}") for d in range(n_dims))
        ggml_type = cur.u32(f"the type of {shown}")
        rel = cur.u64(f"the data offset of {shown}")
        n_elements = math.prod(ne)
        if n_elements > INT64_MAX:
            raise cur.fail(f"tensor {shown} has dimensions {list(ne)} whose product "
                           f"{n_elements} overflows int64")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {shown} has unknown tensor type id {ggml_type}") from None
        if ne[0] % block:
            raise cur.fail(f"tensor {shown}: its row length {ne[0]} is not a multiple of "
                           f"the {qtype.name} block size {block}")
        infos.append((name, ggml_type, ne, rel, n_elements // block * type_size, n_elements))
    return infos


# ---- metadata --------------------------------------------------------------------------

def _reader(path: str) -> gguflib.GGUFReader:
    """The gguf package's reader on a file `inspect_gguf` has passed; its errors become ours."""
    try:
        return gguflib.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - any failure of the package is a bad file here
        raise FormatError(f"{path}: the gguf package cannot read it: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from None


def _shortest_f32(value: Any) -> Any:
    """float32 metadata as the shortest decimal that is the same float32 (1e-05, not
    9.999999747378752e-06): the value the file's writer meant."""
    if isinstance(value, list):
        return [_shortest_f32(v) for v in value]
    return float(str(np.float32(value)))


def _plain_metadata(reader: gguflib.GGUFReader, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields for the header counts
            continue
        try:
            value = field.contents()
            if field.types and field.types[-1] == gguflib.GGUFValueType.FLOAT32:
                value = _shortest_f32(value)
            out[key] = value
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{path}: metadata key {_show(key)} cannot be decoded "
                              f"({type(e).__name__})") from None
    return out


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key -> a plain Python value (str, int, float, bool, or a list of them).

    Arrays of strings come back as lists of str (tokenizer.ggml.tokens, merges).
    """
    path = os.fspath(path)
    inspect_gguf(path)
    return _plain_metadata(_reader(path), path)
