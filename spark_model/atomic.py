"""Putting a completely written file or directory in place without ever losing the old one."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished `tmp` (a sibling of `dest`) to `dest`.

    Whatever was at `dest` is first renamed aside, and removed only once `tmp` stands in
    its place, so an interruption leaves either the old or the new one, never neither.
    """
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        dest.rename(old)
        tmp.rename(dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        tmp.rename(dest)
