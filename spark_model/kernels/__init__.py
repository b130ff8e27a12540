"""Native CPU kernels called from inside the compiled programs (XLA FFI custom calls).

Eight kernels, each with a comment at the top of its source that says why it exists:

- `decode_attention` (decode_attention.cc): single-query attention over the KV cache;
- `prefill_attention` (prefill_attention.cc): causal attention of a prefill chunk's many
  queries over the KV cache;
- `linear` (matvec.cc): the layer products of a decode step, (M <= 8, K) x (K, N) on all
  intra-op threads; larger products (prefill, training) stay XLA dots;
- `argmax` (argmax.cc): the greedy token of each row of logits;
- `rotary` (rotary.cc): the sine and cosine of rotary angles, as spark_model/rotary.py
  computes them, in arrays XLA cannot fuse into (and recompute in) their consumers;
- `packed_linear`, `packed_linear_many` (qmatvec.cc): (M <= 8, K) x block-quantized (N, K)
  weights (spark_model/quant.py), as integer dot products on all intra-op threads; several
  weights that share x in one call. With more rows (prefill) `qmatmul` (qmatmul.cc)
  multiplies bfloat16 tiles on AMX where the CPU has it, else `dequantize` (dequant.cc)
  expands the weight to float32 for an XLA dot.

They are built from source with the machine's C++ compiler on first use, into one library
under ``$SPARK_CACHE_DIR/kernels`` (default ``~/.cache/spark``), keyed by the sources, the
flags, the jax version and the CPU, and registered with XLA.

Everything works without them: when no compiler is found, the build fails, the backend is
not the CPU, ``SPARK_KERNELS=0`` is set or code is traced inside `disabled()` (the wafer
compiler does, to see the model's own operations), plain XLA operations run instead (same
results to rounding, slower). `status()` says which is in use and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).parent
SOURCES = (HERE / "decode_attention.cc", HERE / "matvec.cc", HERE / "argmax.cc",
           HERE / "qmatvec.cc", HERE / "dequant.cc", HERE / "qmatmul.cc",
           HERE / "prefill_attention.cc", HERE / "rotary.cc")
HEADERS = (HERE / "parallel.h", HERE / "packed_args.h")
TARGETS = {  # XLA target name -> exported symbol
    "spark_decode_attention": "SparkDecodeAttention",
    "spark_decode_attention_rows": "SparkDecodeAttentionRows", "spark_matvec": "SparkMatVec",
    "spark_matvec_t": "SparkMatVecT", "spark_argmax": "SparkArgmax",
    "spark_qmatvec": "SparkQMatVec", "spark_dequantize": "SparkDequantize",
    "spark_qmatmul": "SparkQMatMul", "spark_prefill_attention": "SparkPrefillAttention",
    "spark_rotary": "SparkRotary"}
MAX_ROWS = 8  # `linear` runs natively for at most this many rows (matvec.cc's MAX_M)
# Compile flags. -ffast-math lets the compiler vectorise the exp and the dot-product
# reductions; the kernels never form an infinity or a NaN from finite inputs, which that flag
# assumes. -march=native is safe because the cache key includes the CPU's feature flags.
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-std=c++17",
          "-fPIC")
# Sources compiled with exact floating point on top of CFLAGS: the packed product promises
# that a row's result is bitwise the same whatever the number of rows in the call, which the
# reassociation -ffast-math allows would break (it reorders sums differently in the code for
# each row count).
EXACT_FP = {"qmatvec.cc": ("-fno-fast-math", "-ffp-contract=off"),
            "rotary.cc": ("-fno-fast-math", "-ffp-contract=off")}  # rounds as rotary.py
# Link flags: no -ffast-math here. Linking a shared library with it pulls in crtfastmath.o,
# whose initialiser sets flush-to-zero / denormals-are-zero in MXCSR when the library loads,
# and so changes floating point for the whole importing process (GCC bug 55522).
LDFLAGS = ("-shared",)

_state: dict = {}  # "ok": bool, "why": str, "path": Path
_disabled = 0  # > 0 inside `disabled()`
_row_exact = 0  # > 0 inside `row_exact()`


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
        *(f.read_bytes() for f in SOURCES + HEADERS), " ".join(CFLAGS + LDFLAGS).encode(),
        repr(sorted(EXACT_FP.items())).encode(),
        cxx.encode(),
        jax.__version__.encode(), _cpu_tag().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"spark_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        objects = []
        for src in SOURCES:  # compile each source with the kernels' flags ...
            obj = os.path.join(work, src.stem + ".o")
            _run([cxx, *CFLAGS, *EXACT_FP.get(src.name, ()), "-I", jax.ffi.include_dir(),
                  "-c", str(src), "-o", obj])
            objects.append(obj)
        tmp = os.path.join(work, out.name)
        _run([cxx, *LDFLAGS, *objects, "-o", tmp])  # ... and link without them
        os.replace(tmp, out)  # atomic: a concurrent build never sees half a library
    return out


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")


def _load() -> None:
    if os.environ.get("SPARK_KERNELS", "1") == "0":
        _state.update(ok=False, why="disabled by SPARK_KERNELS=0")
        return
    try:
        path = _build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        amx = bool(lib.SparkAmxReady())
        _state.update(ok=True, path=path, amx=amx,
                      why=f"native decode kernels from {path}"
                          + ("; AMX tiles for packed prefill products" if amx else ""))
    except Exception as e:  # any failure leaves the pure-XLA path in place
        _state.update(ok=False, why=f"native decode kernels unavailable: {e}")
        warnings.warn(f"{_state['why']}; using the slower XLA operations", stacklevel=3)


def available() -> bool:
    """Whether the native kernels are built and registered (builds on first call)."""
    if not _state:
        _load()
    return _state["ok"]


def amx_usable() -> bool:
    """Whether products of many rows with packed weights run on AMX tiles (qmatmul.cc): the
    kernels are usable, the CPU and the OS grant AMX, and ``SPARK_AMX=0`` is not set (it is
    read when a function is traced)."""
    return (usable(jnp.zeros((), jnp.float32)) and _state.get("amx", False)
            and os.environ.get("SPARK_AMX", "1") != "0")


def status() -> str:
    """One line: which decode kernels run, and why."""
    if jax.default_backend() != "cpu":
        return f"XLA decode operations (backend {jax.default_backend()})"
    available()
    return _state["why"]


@contextlib.contextmanager
def disabled():
    """Code traced inside this block uses XLA operations only (e.g. to export the step).

    It governs tracing, so it applies to functions traced inside it: a jitted function
    already traced with the same shapes outside the block keeps that trace.
    """
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


@contextlib.contextmanager
def row_exact():
    """Code traced inside this block computes every row of a product, and every query of an
    attention over the cache, bitwise as a one-token decode step does (speculative decoding
    verifies k tokens per sequence in one call and must agree with plain decoding exactly).

    Products of any number of rows run natively, in calls of at most 8 rows (more would be
    an XLA dot): the native kernels compute a row the same way whatever the row count.
    Attention over T > 1 queries per sequence runs the decode kernel, one query per (row,
    position) (`decode_attention_rows`). Like `disabled()`, it governs tracing.
    """
    global _row_exact
    _row_exact += 1
    try:
        yield
    finally:
        _row_exact -= 1


def row_exact_active() -> bool:
    """Whether code traced now is inside `row_exact()`."""
    return _row_exact > 0


def _row_groups(m: int) -> list[tuple[int, int]]:
    """(start, size) of consecutive groups of MAX_ROWS rows (the last one smaller)."""
    return [(a, min(MAX_ROWS, m - a)) for a in range(0, m, MAX_ROWS)]


def _by_row_groups(x_mk: jax.Array, fn) -> list[jax.Array]:
    """fn(rows) -> list of (rows, N_i) arrays, run over `_row_groups` and concatenated."""
    parts = [fn(x_mk[a:a + n]) for a, n in _row_groups(x_mk.shape[0])]
    return [p[0] if len(parts) == 1 else jnp.concatenate(p, axis=0) for p in zip(*parts)]


def usable(*operands: jax.Array) -> bool:
    """Whether operands of these dtypes can go to a native kernel here and now."""
    return (not _disabled and all(a.dtype == jnp.float32 for a in operands)
            and jax.default_backend() == "cpu" and available())


def decode_attention(q_bkgh: jax.Array, k_rksh: jax.Array, v_rksh: jax.Array,
                     pos_b: jax.Array) -> jax.Array:
    """o (B, K, G, H): query b (pre-scaled) over cache row b's positions 0 .. pos_b[b].

    The cache may have more rows R than there are queries; rows past B are not read.
    """
    out = jax.ShapeDtypeStruct(q_bkgh.shape, jnp.float32)
    return jax.ffi.ffi_call("spark_decode_attention", out, vmap_method="sequential")(
        q_bkgh, k_rksh, v_rksh, pos_b.astype(jnp.int32))


def decode_attention_rows(q_qkgh: jax.Array, k_rksh: jax.Array, v_rksh: jax.Array,
                          pos_q: jax.Array, row_q: jax.Array) -> jax.Array:
    """o (Q, K, G, H): query i (pre-scaled) over cache row row_q[i]'s positions 0 .. pos_q[i],
    each computed exactly as `decode_attention` computes a query."""
    out = jax.ShapeDtypeStruct(q_qkgh.shape, jnp.float32)
    return jax.ffi.ffi_call("spark_decode_attention_rows", out, vmap_method="sequential")(
        q_qkgh, k_rksh, v_rksh, pos_q.astype(jnp.int32), row_q.astype(jnp.int32))


def prefill_attention_fits(q_btnh: jax.Array, k_bksh: jax.Array) -> bool:
    """Whether `prefill_attention` takes these shapes: at most 16 query heads per kv head and
    a head dim of 16 to 256 in steps of 16."""
    g, h = q_btnh.shape[2] // k_bksh.shape[1], q_btnh.shape[3]
    return g <= 16 and h % 16 == 0 and 16 <= h <= 256


def prefill_attention(q_bkgth: jax.Array, k_rksh: jax.Array, v_rksh: jax.Array,
                      pos_bt: jax.Array) -> jax.Array:
    """o (B, K, G, T, H): query (b, t) (pre-scaled) over cache row b's positions 0 ..
    pos_bt[b, t], in float32 (callers check `usable` and `prefill_attention_fits` first)."""
    out = jax.ShapeDtypeStruct(q_bkgth.shape, jnp.float32)
    return jax.ffi.ffi_call("spark_prefill_attention", out, vmap_method="sequential")(
        q_bkgth, k_rksh, v_rksh, pos_bt.astype(jnp.int32))


def rotary(pos_n: jax.Array, limbs_4p: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """sin and cos (N, P) f32 of positions (N,) times the frequencies whose turn fractions
    `limbs_4p` holds (the kernel behind `spark_model.rotary.sin_cos`)."""
    out = jax.ShapeDtypeStruct((pos_n.shape[0], limbs_4p.shape[1]), jnp.float32)
    return tuple(jax.ffi.ffi_call("spark_rotary", (out, out), vmap_method="sequential")(
        pos_n.astype(jnp.int32), jnp.asarray(limbs_4p, jnp.uint32)))


def argmax(x_bv: jax.Array) -> jax.Array:
    """(B,) int32: the first index of each row's maximum, or of its first NaN (the kernel
    behind `sampling.argmax`; callers check `usable` first)."""
    out = jax.ShapeDtypeStruct(x_bv.shape[:1], jnp.int32)
    return jax.ffi.ffi_call("spark_argmax", out, vmap_method="sequential")(x_bv)


def linear(x_mk: jax.Array, w: jax.Array, *, transposed: bool = False,
           preferred_element_type=None) -> jax.Array:
    """x (M, K) @ w (K, N), or x @ w.T for a (N, K) w when `transposed`.

    Up to MAX_ROWS rows in f32 on CPU this is the native kernel, which splits the product
    over the intra-op threads (differentiable: its gradient is the XLA one); anything else
    is an XLA dot (accumulating in `preferred_element_type` if given).
    """
    if _row_exact and usable(x_mk, w):
        return _by_row_groups(x_mk, lambda x: _native_linear(x, (w,), transposed))[0]
    if x_mk.shape[0] <= MAX_ROWS and usable(x_mk, w):
        return _native_linear(x_mk, (w,), transposed)[0]
    # Contract w's own axis (no transpose op), so a reader of the program sees which it is.
    return jnp.einsum("mk,nk->mn" if transposed else "mk,kn->mn", x_mk, w,
                      preferred_element_type=preferred_element_type)


def linear_many(x_mk: jax.Array, ws: Sequence[jax.Array]) -> list[jax.Array]:
    """[x @ w for w in ws] for (K, N_i) weights: natively one call that reads x once."""
    if _row_exact and usable(x_mk, *ws):
        return _by_row_groups(x_mk, lambda x: _native_linear(x, tuple(ws), False))
    if x_mk.shape[0] <= MAX_ROWS and usable(x_mk, *ws):
        return list(_native_linear(x_mk, tuple(ws), False))
    return [x_mk @ w for w in ws]


_QMATVEC_FMT = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # qmatvec.cc's Fmt
# Rows up to which a product with an interleaved packed weight stays on qmatvec.cc (passes of
# 8 rows over each part of the weight) rather than expanding the weight for AMX tiles, whose
# cost does not shrink with the rows: a short prompt's prefill.
QMATVEC_ROWS = 256


def packed_linear(x_mk: jax.Array, w) -> jax.Array:
    """x (M, K) @ w.T for a `quant.PackedWeight` w (N, K) -> (M, N) float32.

    Up to MAX_ROWS rows in f32 on CPU (QMATVEC_ROWS for a weight in the interleaved
    layout) this is the native kernel (activations rounded to 8 bits per 32-block; see
    qmatvec.cc for the error bound); more rows on CPU multiply
    bfloat16 tiles on AMX (qmatmul.cc, its error bound there) where `amx_usable`, else
    expand the weight natively (`dequantize`) for an XLA dot; anything else is the XLA product
    `quant.packed_linear` (dequantize, then dot). Not differentiable: packed weights are
    for inference.
    """
    return packed_linear_many(x_mk, [w])[0]


def packed_linear_many(x_mk: jax.Array, ws: Sequence) -> list[jax.Array]:
    """[packed_linear(x, w) for w in ws]; natively, weights of one format share one call
    (x rounded once, one hand-off to the threads)."""
    from spark_model import quant

    for w in ws:
        if x_mk.ndim != 2 or x_mk.shape[1] != w.shape[1]:
            raise quant.QuantError(f"packed_linear: x must be (M, {w.shape[1]}) for a {w.fmt} "
                                   f"weight of shape {w.shape}, got {tuple(x_mk.shape)}")
    if not usable(x_mk):
        return [quant.packed_linear(x_mk, w) for w in ws]
    m = x_mk.shape[0]
    if _row_exact and m > MAX_ROWS:
        return _by_row_groups(x_mk, lambda x: packed_linear_many(x, ws))
    out: list = [None] * len(ws)
    # Few rows (QMATVEC_ROWS for the interleaved layout, else MAX_ROWS) go to qmatvec.cc;
    # more to the AMX tiles, or without them to a float32 expansion and an XLA dot.
    few = [m <= (QMATVEC_ROWS if w.interleaved else MAX_ROWS) for w in ws]
    if not amx_usable():
        for i, w in enumerate(ws):
            if not few[i]:
                out[i] = jnp.einsum("mk,nk->mn", x_mk, dequantize(w, after=x_mk))
    # One call per kernel, format and layout, in first-seen order.
    keys = [("spark_qmatvec" if few[i] else "spark_qmatmul", w.fmt, w.interleaved)
            for i, w in enumerate(ws)]
    for key in dict.fromkeys(k for k, y in zip(keys, out) if y is None):
        target, fmt, _ = key
        idx = [i for i, k in enumerate(keys) if k == key and out[i] is None]
        shapes = tuple(jax.ShapeDtypeStruct((m, ws[i].shape[0]), jnp.float32) for i in idx)
        # The kernel reads m for q4_1 only; the other formats pass d in its place.
        args = [a for i in idx for a in (ws[i].qs, ws[i].d,
                                         ws[i].m if ws[i].m is not None else ws[i].d)]
        ys = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(
            x_mk, *args, fmt=np.int32(_QMATVEC_FMT[fmt]))
        for i, y in zip(idx, ys):
            out[i] = y
    return out


def dequantize(w, after: jax.Array | None = None) -> jax.Array:
    """The (N, K) float32 matrix a `quant.PackedWeight` holds: the native expansion on CPU
    (quant.dequantize's values; q4_1's d q + m within one unit in the last place), else
    `quant.dequantize_jnp`.

    `after`: an array the expansion waits for (not read), normally the activations the
    weight is about to multiply. Without it XLA is free to expand every weight of the model
    at once (it hoists them out of the prefill's loop over chunks, or schedules them all
    first), into hundreds of MB of fresh memory per call, whose page faults cost more than
    expanding each weight again per chunk into a buffer the next weight reuses.
    """
    from spark_model import quant

    if not usable(jnp.zeros((), jnp.float32)):
        return quant.dequantize_jnp(w)
    out = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    after = jnp.zeros((), jnp.float32) if after is None else after
    return jax.ffi.ffi_call("spark_dequantize", out, vmap_method="sequential")(
        w.qs, w.d, w.m if w.m is not None else w.d, after, fmt=np.int32(_QMATVEC_FMT[w.fmt]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_linear(x_mk: jax.Array, ws: tuple[jax.Array, ...], transposed: bool):
    m = x_mk.shape[0]
    if transposed:  # one (N, K) weight
        out = jax.ShapeDtypeStruct((m, ws[0].shape[0]), jnp.float32)
        return (jax.ffi.ffi_call("spark_matvec_t", out, vmap_method="sequential")(x_mk, ws[0]),)
    outs = tuple(jax.ShapeDtypeStruct((m, w.shape[1]), jnp.float32) for w in ws)
    return tuple(jax.ffi.ffi_call("spark_matvec", outs, vmap_method="sequential")(x_mk, *ws))


def _native_linear_fwd(x_mk, ws, transposed):
    return _native_linear(x_mk, ws, transposed), (x_mk, ws)


def _native_linear_bwd(transposed, res, gs):
    x_mk, ws = res
    if transposed:  # y = x @ w.T
        return gs[0] @ ws[0], (gs[0].T @ x_mk,)
    dx = sum(g @ w.T for g, w in zip(gs, ws))
    return dx, tuple(x_mk.T @ g for g in gs)


_native_linear.defvjp(_native_linear_fwd, _native_linear_bwd)
