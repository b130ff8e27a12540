"""The compressor a code model must beat: `xz -9e`'s bits per byte on the same files.

A language model is a compressor (arithmetic coding turns its bits per byte into a file
size within a few bytes), so a general-purpose compressor run on the files the model
scores is its floor of usefulness. Each file is compressed on its own, as the model scores
each file on its own: the xz container (`lzma.FORMAT_XZ`, CRC64) at preset 9 with the
extreme flag, which is what `xz -9e` writes. The container's fixed bytes (headers, index,
check, about 60 per file) are counted, as a file written by `xz -9e` carries them.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path
from typing import Iterable

PRESET = 9 | lzma.PRESET_EXTREME


def xz_size(data: bytes) -> int:
    """Bytes of `data` compressed as `xz -9e` does."""
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                             preset=PRESET))


def xz_bits_per_byte(paths: Iterable[str | os.PathLike]) -> dict:
    """{"bits_per_byte", "bytes", "compressed_bytes", "files"} of `xz -9e` over the files,
    each compressed alone. Unreadable, non-UTF-8 and empty files are skipped, the rule
    `eval.bpb.bits_per_byte` uses, so both figures cover the same bytes."""
    raw = packed = files = 0
    for p in map(Path, paths):
        try:
            data = p.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not data:
            continue
        raw += len(data)
        packed += xz_size(data)
        files += 1
    return {"bits_per_byte": 8.0 * packed / raw if raw else float("nan"), "bytes": raw,
            "compressed_bytes": packed, "files": files}
