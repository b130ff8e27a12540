"""The training corpus: source files and JSONL records, deduplicated, split by file.

A corpus is built from *sources*:

* ``stdlib``: the running interpreter's standard library
  (``spark_model.tokenizer.stdlib_python_files()``, ~1,790 files, 31 MB on CPython 3.11),
  named relative to the stdlib directory ("json/decoder.py");
* ``site-packages``: the Python code of the project's installed dependencies, the closure
  of ``spark-model``'s requirements without extras (train/site_sources.py; ~5,200 files,
  88 MB), named ``site-packages/<dist>/<path relative to site-packages>``;
* a directory: every ``.py`` file under it, recursively (sorted by path);
* a ``.jsonl`` file: one JSON object per line whose ``"text"`` (or ``"content"``) field is
  one document; the record's ``"path"`` field names it if present, else ``<file>:<line>``;
* any other file: that one file;
* nothing (``sources=None``): ``stdlib``.

A named source wins over a path of the same name; write ``./stdlib`` for a directory.

Every document has a *name*: its path relative to the root it was found under (a directory
source's root is the directory; the stdlib's root is the stdlib directory; a single file's
root is its parent). Unreadable and non-UTF-8 files, bad JSONL lines, empty documents and
oversized ones (more than MAX_DOC_BYTES = 1 MiB, or a line longer than MAX_LINE_CHARS =
20,000 characters: generated tables and serialized data rather than code anyone writes; the
standard library has neither) are skipped and counted; exact copies (same SHA-256 of the text) are kept once, the first in
source order then name order.

The train/validation split is by document and depends on the name alone:

    validation  <=>  int(sha256(name)[:16 hex], 16) % 1000 < val_permille   (default 20: ~2%)

so it is deterministic, identical on every machine with the same tree, unchanged when other
files are added, and a validation document is never seen in training (deduplication runs
before the split, so an exact copy of a validation file cannot hide in the training set).

Evaluation code gets the held-out files with::

    from train.corpus import validation_files
    files = validation_files()            # stdlib validation split, list[Path]
    eval.bpb.bits_per_byte(model, files)  # bits per byte on exactly what training never saw
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_VAL_PERMILLE = 20  # ~2% of documents held out
STDLIB = "stdlib"  # the named sources
SITE_PACKAGES = "site-packages"
NAMED_SOURCES = (STDLIB, SITE_PACKAGES)
MAX_DOC_BYTES = 1 << 20  # larger documents are generated data, not code: skipped
MAX_LINE_CHARS = 20_000  # ... and so are documents with a line longer than this


class CorpusError(ValueError):
    """A data source that does not exist, or a corpus with no usable text."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One training or validation document."""

    name: str  # path relative to its root ("json/decoder.py") or "<file.jsonl>:<line>"
    text: str
    sha256: str  # hex digest of the UTF-8 text: the dedup and cache key
    path: Path | None = None  # the file it came from (None for JSONL records)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclasses.dataclass
class CorpusStats:
    """What loading found; `skipped_*` lists hold the first few offenders by name."""

    seen: int = 0  # candidate documents (files + JSONL lines)
    unreadable: int = 0  # OSError while reading
    non_utf8: int = 0  # bytes that are not valid UTF-8
    bad_records: int = 0  # JSONL lines that are not an object with a text field
    empty: int = 0  # documents with no text
    oversized: int = 0  # over MAX_DOC_BYTES, or a line over MAX_LINE_CHARS
    duplicates: int = 0  # exact copies of an earlier document
    kept: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)

    def skip(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(f"{what} ({kind})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        parts = [f"{self.kept} documents kept of {self.seen}"]
        for kind in ("duplicates", "empty", "oversized", "non_utf8", "unreadable",
                     "bad_records"):
            n = getattr(self, kind)
            if n:
                parts.append(f"{n} {kind.replace('_', '-')}")
        return ", ".join(parts)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(name: str, val_permille: int = DEFAULT_VAL_PERMILLE) -> bool:
    """Whether the document called `name` belongs to the validation split."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % 1000 < val_permille


def _doc(name: str, text: str, path: Path | None) -> Document:
    return Document(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), path)


def is_oversized(text: str) -> bool:
    """Whether `text` is skipped as generated data (see the module docstring)."""
    if len(text) <= MAX_LINE_CHARS:
        return False
    return (len(text.encode("utf-8")) > MAX_DOC_BYTES
            or max(map(len, text.split("\n"))) > MAX_LINE_CHARS)


def _read_file(path: Path, name: str, stats: CorpusStats) -> Document | None:
    stats.seen += 1
    try:
        if path.stat().st_size > MAX_DOC_BYTES:
            stats.skip("oversized", name)
            return None
        data = path.read_bytes()
    except OSError:
        stats.skip("unreadable", name)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("non_utf8", name)
        return None
    return _doc(name, text, path)


def _jsonl_docs(path: Path, stats: CorpusStats) -> Iterable[Document]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read data file {path}: {e.strerror or e}") from None
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        stats.seen += 1
        where = f"{path.name}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats.skip("non_utf8", where)
            continue
        except ValueError:
            stats.skip("bad_records", where)
            continue
        text = None
        if isinstance(record, dict):
            text = record.get("text", record.get("content"))
        if not isinstance(text, str):
            stats.skip("bad_records", where)
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
            stats.skip("non_utf8", where)
            continue
        name = record.get("path")
        name = name if isinstance(name, str) and name else where
        yield _doc(name, text, None)


def _source_docs(source: Path | str, stats: CorpusStats) -> Iterable[Document]:
    from spark_model.tokenizer import stdlib_python_files

    if source == STDLIB:
        root = stdlib_root()
        for f in stdlib_python_files():
            doc = _read_file(f, f.relative_to(root).as_posix(), stats)
            if doc is not None:
                yield doc
        return
    if source == SITE_PACKAGES:
        from train.site_sources import site_documents_files
        try:
            files = site_documents_files()
        except LookupError as e:
            raise CorpusError(f"data source {SITE_PACKAGES}: {e}") from None
        for name, f in files:
            doc = _read_file(f, name, stats)
            if doc is not None:
                yield doc
        return
    assert isinstance(source, Path)
    if source.is_dir():
        for f in sorted(p for p in source.rglob("*.py") if p.is_file()):
            doc = _read_file(f, f.relative_to(source).as_posix(), stats)
            if doc is not None:
                yield doc
    elif source.suffix == ".jsonl":
        yield from _jsonl_docs(source, stats)
    else:
        doc = _read_file(source, source.name, stats)
        if doc is not None:
            yield doc


def load_corpus(sources: Sequence[str | os.PathLike] | None = None
                ) -> tuple[list[Document], CorpusStats]:
    """All usable documents of `sources` (None: the stdlib), deduplicated, in source order.

    A source is a named one (NAMED_SOURCES) or a path. Raises CorpusError for a source path
    that does not exist.
    """
    paths: list[Path | str] = []
    for s in sources or [STDLIB]:
        if isinstance(s, str) and s in NAMED_SOURCES:
            paths.append(s)
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise CorpusError(f"data path {p} does not exist (named sources: "
                              f"{', '.join(NAMED_SOURCES)})")
        paths.append(p)
    stats = CorpusStats()
    seen_hashes: set[str] = set()
    docs: list[Document] = []
    for source in paths:
        for doc in _source_docs(source, stats):
            if not doc.text:
                stats.skip("empty", doc.name)
            elif is_oversized(doc.text):
                stats.skip("oversized", doc.name)
            elif doc.sha256 in seen_hashes:
                stats.skip("duplicates", doc.name)
            else:
                seen_hashes.add(doc.sha256)
                docs.append(doc)
    stats.kept = len(docs)
    return docs, stats


def split_corpus(docs: Sequence[Document], val_permille: int = DEFAULT_VAL_PERMILLE
                 ) -> tuple[list[Document], list[Document]]:
    """(train, validation) by `is_validation(doc.name)`; order within each is kept."""
    if not 0 <= val_permille < 1000:
        raise CorpusError(f"val_permille must be in [0, 1000), got {val_permille}")
    train, val = [], []
    for d in docs:
        (val if is_validation(d.name, val_permille) else train).append(d)
    return train, val


def validation_documents(sources: Sequence[str | os.PathLike] | None = None,
                         val_permille: int = DEFAULT_VAL_PERMILLE) -> list[Document]:
    """The validation split of `sources` (None: the stdlib), as documents."""
    docs, _ = load_corpus(sources)
    return split_corpus(docs, val_permille)[1]


def validation_files(sources: Sequence[str | os.PathLike] | None = None,
                     val_permille: int = DEFAULT_VAL_PERMILLE) -> list[Path]:
    """Paths of the validation files of `sources` (None: the stdlib's held-out files).

    JSONL records have no file of their own and are left out; use `validation_documents`.
    """
    return [d.path for d in validation_documents(sources, val_permille) if d.path is not None]


def fingerprint(docs: Sequence[Document]) -> str:
    """SHA-256 over the documents' names and content hashes, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode("utf-8") + b"\0" + d.sha256.encode("ascii") + b"\n")
    return h.hexdigest()
