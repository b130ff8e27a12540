"""The project's installed dependencies as training text, and the packages kept out of it.

The *closure* of a distribution is the set of installed distributions it needs: its
requirements without an extra (``pip install spark-model`` installs exactly these), their
requirements without an extra, and so on. Requirement markers are evaluated for the running
interpreter with no extra selected, so ``pytest; extra == "test"`` and
``tomli; python_version < "3.11"`` on 3.11 are left out. A requirement that is not installed
is left out too (it is listed in `Closure.missing`), since there is no code to read.

The training source ``site-packages`` (see train/corpus.py) is the Python code of the closure
of ``spark-model`` (the project itself excluded): each distribution's installed ``.py``
files as its RECORD lists them (`importlib.metadata` ``dist.files``), named
``site-packages/<normalized dist name>/<path relative to site-packages>`` so that they never
collide with standard-library names. Files RECORD places outside site-packages (``../../bin``)
are left out.

Everything installed but *outside* the closure (`outside_closure`) is code the model never
sees: the test extras (pytest, pluggy, iniconfig, openai, ...) on a machine set up with
``pip install -e '.[test]'``. The evaluation reads pytest's source as its default
out-of-distribution code (eval/sources.py).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import re
from pathlib import Path

PROJECT = "spark-model"
SITE_PREFIX = "site-packages"


def normalize(name: str) -> str:
    """A distribution name in its canonical form (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, md.Distribution]:
    """Normalized name -> installed distribution; the first on sys.path wins, as for import."""
    dists: dict[str, md.Distribution] = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(normalize(name), d)
    return dists


def requirements(dist: md.Distribution) -> list[str]:
    """Normalized names of `dist`'s requirements that apply here without any extra."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(normalize(req.name))
    return names


@dataclasses.dataclass(frozen=True)
class Closure:
    """The installed closure of `root` (root excluded), by normalized name, sorted."""

    root: str
    members: tuple[str, ...]
    missing: tuple[str, ...]  # required but not installed


def closure(root: str = PROJECT, dists: dict[str, md.Distribution] | None = None) -> Closure:
    """The installed distributions `root` needs, recursively (a breadth-first walk).

    Raises LookupError when `root` itself is not installed."""
    dists = installed() if dists is None else dists
    start = normalize(root)
    if start not in dists:
        raise LookupError(f"distribution {root!r} is not installed, so its dependencies "
                          "cannot be found")
    seen, missing = {start}, set()
    todo = [start]
    while todo:
        name = todo.pop()
        for req in requirements(dists[name]):
            if req in seen or req in missing:
                continue
            if req not in dists:
                missing.add(req)
                continue
            seen.add(req)
            todo.append(req)
    seen.discard(start)
    return Closure(start, tuple(sorted(seen)), tuple(sorted(missing)))


def python_files(dist: md.Distribution) -> list[tuple[str, Path]]:
    """(path relative to site-packages, absolute path) of `dist`'s installed .py files,
    sorted by relative path; [] when the distribution has no RECORD."""
    out = []
    for f in dist.files or ():
        rel = f.as_posix()
        if not rel.endswith(".py") or rel.startswith(("../", "/")) or "/../" in rel:
            continue
        out.append((rel, Path(dist.locate_file(f))))
    return sorted(out)


def site_documents_files(root: str = PROJECT) -> list[tuple[str, Path]]:
    """(document name, path) of every .py file of `root`'s closure: by distribution name,
    then path; names are ``site-packages/<dist>/<relative path>``."""
    dists = installed()
    files = []
    for name in closure(root, dists).members:
        for rel, path in python_files(dists[name]):
            files.append((f"{SITE_PREFIX}/{name}/{rel}", path))
    return files


def outside_closure(root: str = PROJECT) -> list[str]:
    """Installed distributions (normalized names, sorted) that are neither `root` nor in its
    closure: code a model trained on ``site-packages`` never saw."""
    dists = installed()
    inside = set(closure(root, dists).members) | {normalize(root)}
    return sorted(n for n in dists if n not in inside)
