"""Repository-level order of the training documents: packages whole, imports first.

Training packs the documents, in order, into one token stream that is cut into windows
(train/data.py). In the order documents are found (by path) a window holds whatever files
happen to sort next to each other. Code refers to code defined elsewhere in its package, so
this module orders the stream the way a reader would: all files of one package together, and
inside a package every module before the modules that import it. A long window then tends to
contain the definitions the code in it uses, which is what a model must learn to look up when
it is given a whole repository as context. Document boundaries stay: each document is still
its own ``BOS text EOS``.

Packages
    A document's package is the first directory of its name ("json/decoder.py" -> "json");
    a top-level module is a package of its own ("heapq.py" -> "heapq"). Names of the
    ``site-packages`` source keep their distribution: "site-packages/numpy/numpy/linalg/x.py"
    -> "site-packages/numpy/numpy". Packages come in sorted order of that key (a fixed order,
    not a seeded shuffle: the training iterator already shuffles the windows).

Imports
    A document's module name is its path inside the package with ``/`` as ``.``
    ("json/decoder.py" -> "json.decoder", "json/__init__.py" -> "json"). Its imports are
    every ``import`` and ``from ... import`` statement in it (at any depth, relative ones
    resolved against the module's own package); an imported name ("X.a" for
    ``from X import a``) that is a module of the same package, or else the longest such module
    that prefixes it, is a dependency. To stay fast
    (this runs at every start on ~90 MB of code) only the statements are parsed with `ast`,
    not whole files: lines that begin with ``import`` or ``from ... import`` (joined with
    their bracketed or backslash continuations); a statement that does not parse on its own
    (say, a line of prose in a docstring) is ignored.

Order inside a package
    Modules whose dependencies have all been placed are placed next, smallest name first.
    When none is free the remaining modules import each other in a cycle; the one with the
    fewest unplaced dependencies (then the smallest name) is placed to break it. The result
    depends only on the documents' names and texts: it is deterministic.

Only the training split is reordered; validation documents are scored one by one and keep
their order. Runs started before this order existed keep theirs (TrainConfig.repo_order).
"""

from __future__ import annotations

import ast
import heapq
import re
from typing import Sequence, TypeVar

from train.site_sources import SITE_PREFIX

_IMPORT_LINE = re.compile(r"^[ \t]*(?:import[ \t]|from[ \t]+[\w.]*[ \t]+import\b)", re.M)

D = TypeVar("D")  # anything with .name and .text (train.corpus.Document)


def package_and_module(name: str) -> tuple[str, str]:
    """(package key, dotted module name) of a document called `name`."""
    parts = name.split("/")
    prefix = ""
    if len(parts) > 2 and parts[0] == SITE_PREFIX:
        prefix, parts = f"{parts[0]}/{parts[1]}/", parts[2:]
    if parts[-1].endswith(".py"):
        parts[-1] = parts[-1][:-3]
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return prefix + parts[0], ".".join(parts)


def import_statements(text: str) -> list[ast.stmt]:
    """The import statements of `text` that parse on their own (see the module docstring)."""
    out: list[ast.stmt] = []
    lines = text.split("\n")
    line, prev = 0, 0
    for m in _IMPORT_LINE.finditer(text):  # in order, each at the start of a line
        line += text.count("\n", prev, m.start())
        prev = m.start()
        i = line
        stmt = lines[i].strip()
        j = i
        while j + 1 < len(lines) and (stmt.endswith("\\") or stmt.count("(") > stmt.count(")")):
            j += 1
            stmt += "\n" + lines[j].strip()
        try:
            out.extend(ast.parse(stmt).body)
        except (SyntaxError, ValueError):
            continue
    return out


def imported_names(module: str, is_package: bool, text: str) -> set[str]:
    """Dotted names `text` imports: ``X.a`` for ``from X import a`` (resolved to ``X`` when
    ``a`` is not a module), ``X`` for ``from X import *``; relative imports resolved from
    `module` (a package's own name when `is_package`)."""
    names: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in import_statements(text):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(here):
                    continue
                base_parts = here[:len(here) - (node.level - 1)]
                if node.module:
                    base_parts = base_parts + node.module.split(".")
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            if not base:
                continue
            names.update(base if a.name == "*" else f"{base}.{a.name}" for a in node.names)
    return names


def _dependencies(modules: dict[str, list[int]], own: int, module: str, is_package: bool,
                  text: str) -> set[int]:
    deps: set[int] = set()
    for name in imported_names(module, is_package, text):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):  # the module itself, else its longest parent
            hit = modules.get(".".join(parts[:k]))
            if hit is not None:
                deps.update(hit)
                break
    deps.discard(own)
    return deps


def _order_package(names: list[str], deps: list[set[int]]) -> list[int]:
    """Indices 0..n-1 with dependencies first, ties and cycles broken as documented."""
    n = len(names)
    users: list[list[int]] = [[] for _ in range(n)]
    left = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [(names[i], i) for i in range(n) if not left[i]]
    heapq.heapify(ready)
    placed = [False] * n
    order: list[int] = []
    while len(order) < n:
        if ready:
            _, i = heapq.heappop(ready)
        else:  # a cycle: place the least-blocked module
            i = min((i for i in range(n) if not placed[i]), key=lambda i: (left[i], names[i]))
        if placed[i]:
            continue
        placed[i] = True
        order.append(i)
        for u in users[i]:
            left[u] -= 1
            if not left[u] and not placed[u]:
                heapq.heappush(ready, (names[u], u))
    return order


def repo_order(docs: Sequence[D]) -> list[D]:
    """`docs` in repository order (see the module docstring); a permutation of them."""
    groups: dict[str, list[int]] = {}
    info = []
    for k, d in enumerate(docs):
        package, module = package_and_module(d.name)
        groups.setdefault(package, []).append(k)
        info.append((module, d.name.endswith("__init__.py")))
    out: list[D] = []
    for package in sorted(groups):
        members = sorted(groups[package], key=lambda k: docs[k].name)
        modules: dict[str, list[int]] = {}
        for local, k in enumerate(members):
            modules.setdefault(info[k][0], []).append(local)
        deps = [_dependencies(modules, local, info[k][0], info[k][1], docs[k].text)
                for local, k in enumerate(members)]
        out.extend(docs[members[i]] for i in
                   _order_package([docs[k].name for k in members], deps))
    return out
