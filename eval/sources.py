"""The code the evaluation tasks read by default: files the default training never saw.

- "stdlib-heldout": the held-out standard-library files of the training split
  (`train.corpus.validation_files`), named relative to the stdlib's directory;
- "optax": optax's source without its tests, named relative to site-packages. optax is a
  dependency of this package, so it is always installed, and the default training corpus
  (the standard library) does not contain it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def default_code() -> dict[str, tuple[list[Path], Path]]:
    """Source name -> (its .py files in sorted path order, the root their names start at)."""
    import optax

    from train.corpus import validation_files

    root = Path(optax.__file__).parent
    return {
        "stdlib-heldout": (sorted(validation_files()), Path(sysconfig.get_paths()["stdlib"])),
        "optax": (sorted(p for p in root.rglob("*.py") if "_test" not in p.name), root.parent),
    }
