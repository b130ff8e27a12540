"""The corpus manifest: which files a run trains and validates on, saved in the run.

``<out>/training/corpus.json`` lists every document the corpus kept (training and
validation, in the order the sources yielded them, before any reordering) with its UTF-8
byte size and SHA-256::

    {"format": "spark-corpus-manifest", "version": 1, "sources": [...],
     "documents": [["json/decoder.py", 12472, "3b5c..."], ...]}

A run writes it when it starts. On ``--resume`` the corpus is rebuilt from the same
sources and compared with it before anything is tokenized: a file added, removed or changed
(say, a dependency upgraded in site-packages) stops the resume with one line naming the
first difference and how many files differ, instead of silently tokenizing a different
corpus. Runs saved before manifests existed have none and resume as before (their corpus
fingerprints in run.json are still checked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from train.config import TrainError
from train.corpus import Document

MANIFEST_FILE = "corpus.json"
MANIFEST_FORMAT = "spark-corpus-manifest"
MANIFEST_VERSION = 1


class ManifestError(TrainError):
    """A manifest that cannot be read, or a corpus that no longer matches it."""


def build(docs: Sequence[Document], sources: Sequence[str]) -> dict:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "sources": list(sources),
            "documents": [[d.name, d.nbytes, d.sha256] for d in docs]}


def write(path: Path, manifest: dict) -> None:
    """Write `manifest` to `path` atomically (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read(path: Path) -> dict | None:
    """The manifest at `path`; None when there is none (a run saved before manifests)."""
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("documents"), list):
            raise ValueError
        return m
    except (ValueError, OSError, AttributeError):
        raise ManifestError(f"the corpus manifest {path} is damaged; cannot check the "
                            "corpus for a resume") from None


def difference(saved: dict, docs: Sequence[Document]) -> tuple[int, str] | None:
    """(number of differing document names, a description of the first) between a saved
    manifest and the corpus `docs`, or None when they are the same. The first is taken in
    the saved order, then the new documents in theirs."""
    old: dict[str, list[tuple[int, str]]] = {}
    for name, size, sha in saved["documents"]:
        old.setdefault(name, []).append((int(size), sha))
    new: dict[str, list[tuple[int, str]]] = {}
    for d in docs:
        new.setdefault(d.name, []).append((d.nbytes, d.sha256))
    first = None
    count = 0
    for name in [*old, *(n for n in new if n not in old)]:
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        count += 1
        if first is None:
            first = (f"{name} (removed)" if b is None else f"{name} (added)" if a is None
                     else f"{name} (changed)")
    return None if first is None else (count, first)


def check(saved: dict, docs: Sequence[Document], out: Path) -> None:
    """Raise ManifestError when `docs` differ from the saved manifest of the run in `out`."""
    diff = difference(saved, docs)
    if diff is not None:
        count, first = diff
        raise ManifestError(f"the corpus changed since the run in {out} started: {count} "
                            f"file{'s' if count != 1 else ''} differ{'' if count != 1 else 's'}"
                            f", first {first}; cannot resume exactly (restore the files or "
                            "start a new run)")
