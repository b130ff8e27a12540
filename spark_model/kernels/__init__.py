"""Native CPU kernels called from inside the compiled programs (XLA FFI custom calls).

One kernel today: `decode_attention`, single-query attention over the KV cache (see
decode_attention.cc for why it exists). It is built from source with the machine's C++
compiler on first use, into ``$SPARK_CACHE_DIR/kernels`` (default ``~/.cache/spark``), keyed
by the source, the flags, the jax version and the CPU, and registered with XLA.

Everything works without it: when no compiler is found, the build fails, the backend is not
the CPU or ``SPARK_KERNELS=0`` is set, `kv_cache` uses its pure-XLA attention instead (same
results, slower at long context). `status()` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = "spark_decode_attention"
# -ffast-math lets the compiler vectorise the exp and the dot-product reductions; the kernel
# never forms an infinity or a NaN from finite inputs, which that flag assumes.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-std=c++17", "-shared", "-fPIC")

_state: dict = {}  # "ok": bool, "why": str, "path": Path


def _cache_dir() -> Path:
    root = os.environ.get("SPARK_CACHE_DIR") or Path.home() / ".cache" / "spark"
    return Path(root) / "kernels"


def _cpu_tag() -> str:
    """The CPU's feature flags (the library is built with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), jax.__version__.encode(),
        _cpu_tag().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    if os.environ.get("SPARK_KERNELS", "1") == "0":
        _state.update(ok=False, why="disabled by SPARK_KERNELS=0")
        return
    try:
        path = _build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SparkDecodeAttention),
                                    platform="cpu")
        _state.update(ok=True, why=f"native decode attention from {path}", path=path)
    except Exception as e:  # any failure leaves the pure-XLA path in place
        _state.update(ok=False, why=f"native decode attention unavailable: {e}")
        warnings.warn(f"{_state['why']}; using the slower XLA attention", stacklevel=3)


def available() -> bool:
    """Whether the native decode attention is built and registered (builds on first call)."""
    if not _state:
        _load()
    return _state["ok"]


def status() -> str:
    """One line: which decode attention runs, and why."""
    if jax.default_backend() != "cpu":
        return f"XLA decode attention (backend {jax.default_backend()})"
    available()
    return _state["why"]


def usable(q: jax.Array, k: jax.Array) -> bool:
    """Whether a decode step with these operands can use the kernel."""
    return (q.dtype == jnp.float32 and k.dtype == jnp.float32
            and jax.default_backend() == "cpu" and available())


def decode_attention(q_bkgh: jax.Array, k_rksh: jax.Array, v_rksh: jax.Array,
                     pos_b: jax.Array) -> jax.Array:
    """o (B, K, G, H): query b (pre-scaled) over cache row b's positions 0 .. pos_b[b].

    The cache may have more rows R than there are queries; rows past B are not read.
    """
    out = jax.ShapeDtypeStruct(q_bkgh.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        q_bkgh, k_rksh, v_rksh, pos_b.astype(jnp.int32))
