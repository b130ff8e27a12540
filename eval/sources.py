"""The code the evaluation tasks read by default: files the default training never saw.

- "stdlib-heldout": the held-out standard-library files of the training split
  (`train.corpus.validation_files`), named relative to the stdlib's directory;
- "pytest": pytest's installed source (its packages ``_pytest`` and ``pytest``), named
  relative to site-packages. The training corpus is the standard library plus the code of the
  project's dependencies (train/site_sources.py); pytest is only a test extra
  (``pip install -e '.[test]'``), outside that closure (`train.site_sources.outside_closure`
  lists everything that is), so no training source contains it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Sequence

OUT_OF_CORPUS = "pytest"  # the distribution read as code outside the training corpus
DEFAULT_SOURCES = ("stdlib-heldout", OUT_OF_CORPUS)


class SourcesError(RuntimeError):
    """Default evaluation code that is not available here."""


def out_of_corpus_code(dist_name: str = OUT_OF_CORPUS) -> tuple[list[Path], Path]:
    """(the .py files of installed distribution `dist_name` in sorted path order,
    site-packages: the root their names start at)."""
    from train.site_sources import installed, normalize, python_files

    dist = installed().get(normalize(dist_name))
    files = python_files(dist) if dist is not None else []
    if not files:
        raise SourcesError(f"{dist_name} is not installed (or lists no .py files), so there "
                           f"is no default code from outside the training corpus; install "
                           f"the test extras (pip install -e '.[test]') or pass the data "
                           "option of the task")
    return [p for _, p in files], Path(dist.locate_file(""))


def default_code(names: Sequence[str] = DEFAULT_SOURCES) -> dict[str, tuple[list[Path], Path]]:
    """Source name -> (its .py files in sorted path order, the root their names start at),
    for the sources `names` (default: both)."""
    out: dict[str, tuple[list[Path], Path]] = {}
    for name in names:
        if name == "stdlib-heldout":
            from train.corpus import validation_files
            out[name] = (sorted(validation_files()), Path(sysconfig.get_paths()["stdlib"]))
        elif name == OUT_OF_CORPUS:
            out[name] = out_of_corpus_code()
        else:
            raise SourcesError(f"unknown default source {name!r}; known: "
                               f"{', '.join(DEFAULT_SOURCES)}")
    return out
