"""Micro-benchmark of the packed products (kernels.packed_linear) against the f32 kernel.

For SmolLM2-135M's matrix shapes (N out, K in): (1536, 576) gate/up, (576, 1536) down and
(49152, 576) the tied output projection, at 1 and 8 activation rows, it times a chain of
products inside one compiled loop (so dispatch is excluded) and reports, per format, the
time per product, the bytes it reads (packed quants + scales, `PackedWeight.nbytes`) per
second, and the speedup over the f32 `kernels.linear` on the same shape (the faster of the
two weight orientations the model uses). Each format runs in the row layout and in the
interleaved one a loaded model uses (`quant.interleave`; "q4_1/16"). Not a test: figures depend on the machine's load.

    python -m eval.bench_quant [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from spark_model import kernels, quant

SHAPES = ((1536, 576), (576, 1536), (49152, 576))  # (N, K) of SmolLM2-135M's products
ROWS = (1, 8)
TARGET_BYTES = 3e9  # bytes read per timed chain (sets the iteration count)


def _time_chain(product, x: jax.Array, w, n_bytes: int, runs: int) -> float:
    """Seconds per product: the best of `runs` chains of products, each feeding the next x."""
    iters = int(max(20, min(5000, TARGET_BYTES // n_bytes)))

    @jax.jit
    def chain(x, w):
        def body(_, x):
            return x + product(x, w).sum(axis=1, keepdims=True) * 1e-12
        return jax.lax.fori_loop(0, iters, body, x)

    chain(x, w).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        chain(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / iters


def bench(runs: int = 5, log=print) -> list[dict]:
    """One row per (shape, rows, format): seconds, GB/s of bytes read, speedup over f32."""
    rng = np.random.default_rng(0)
    out = []
    log(f"kernels: {kernels.status()}")
    for n_n, k_n in SHAPES:
        w = (rng.standard_normal((n_n, k_n)) * 0.02).astype(np.float32)
        w_nk, w_kn = jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
        packed = {}
        for f in quant.FORMATS:  # each format in the row layout, then interleaved (rows/16)
            pw = quant.quantize(w, f)
            packed[f] = jax.tree.map(jnp.asarray, pw)
            packed[f + "/16"] = jax.tree.map(jnp.asarray, quant.interleave(pw))
        for m in ROWS:
            x = jnp.asarray(rng.standard_normal((m, k_n)).astype(np.float32))
            f32_bytes = n_n * k_n * 4
            t_f32 = min(
                _time_chain(lambda x, w: kernels.linear(x, w, transposed=True), x, w_nk,
                            f32_bytes, runs),
                _time_chain(lambda x, w: kernels.linear(x, w), x, w_kn, f32_bytes, runs))
            rows = [dict(shape=[n_n, k_n], rows=m, format="f32", seconds=t_f32,
                         bytes=f32_bytes, gb_per_s=f32_bytes / t_f32 / 1e9, speedup=1.0)]
            for f, pw in packed.items():
                t = _time_chain(kernels.packed_linear, x, pw, pw.nbytes, runs)
                rows.append(dict(shape=[n_n, k_n], rows=m, format=f, seconds=t,
                                 bytes=pw.nbytes, gb_per_s=pw.nbytes / t / 1e9,
                                 speedup=t_f32 / t))
            for r in rows:
                log(f"N={n_n:>6} K={k_n:>5} M={m}  {r['format']:>8}: "
                    f"{r['seconds'] * 1e6:9.1f} us  {r['bytes'] / 2**20:7.2f} MiB  "
                    f"{r['gb_per_s']:6.1f} GB/s  x{r['speedup']:.2f} vs f32")
            out.extend(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed chains per figure (best kept)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    rows = bench(args.runs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
