"""Reading the small JSON files that describe what a directory holds: each names its format
and version, so a file from another tool or a later release is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_versioned_json(path: Path, fmt: str, version: int | tuple[int, ...],
                        error: type[Exception], *, what: str = "") -> dict[str, Any]:
    """The JSON object at `path`, whose "format" must be `fmt` and "version" `version` (or
    one of several).

    Every problem raises `error` with a one-line message naming the file; `what` names the
    thing a wrong version belongs to ("checkpoint format"), default the file itself.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not a {fmt} file")
    versions = version if isinstance(version, tuple) else (version,)
    if data.get("version") not in versions or isinstance(data.get("version"), bool):
        owner = f"{path.parent} has {what} version" if what else f"{path} has version"
        readable = " and ".join(str(v) for v in versions)
        raise error(f"{owner} {data.get('version')}; this release reads version {readable}")
    return data
