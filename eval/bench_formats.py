"""Decode speed and time to first token at several weight formats, side by side.

A quick comparison of one model's weight formats on a shared machine, where only runs taken
in the same process, alternating, can be compared: each format's model is loaded once
(`spark_model.load(model, weights=...)`, "stored" for the source's own formats), compiled
and warmed up, then the runs alternate between them; best and median of `--runs`.

  decode: a 16-token prompt, `--new-tokens` greedy tokens (end ids ignored), batch 1;
  TTFT:   a `--prompt-tokens` prompt and one new token (a packed model's prefill expands
          each weight to float32 before its dot, so it should match float32's).

    python -m eval.bench_formats [--model smollm2-135m] [--formats f32,stored]
                                 [--new-tokens 256] [--prompt-tokens 1000] [--runs 8]

`spark bench decode --weights FORMAT` is the full benchmark (roofline, llama.cpp).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _alternate(models: dict, fn, runs: int) -> dict[str, list[float]]:
    for m in models.values():  # compile and warm up
        fn(m)
    times: dict[str, list[float]] = {f: [] for f in models}
    for _ in range(runs):
        for f, m in models.items():
            t0 = time.perf_counter()
            fn(m)
            times[f].append(time.perf_counter() - t0)
    return times


def run(model: str, formats: list[str], *, new_tokens: int = 256, prompt_tokens: int = 1000,
        runs: int = 8, log=print) -> dict:
    import spark_model
    from eval.bench_decode import _prompt_ids

    models = {f: spark_model.load(model, weights=None if f == "stored" else f,
                                  capacity=max(prompt_tokens, 16 + new_tokens) + 64)
              for f in formats}
    first = next(iter(models.values()))
    short, long = _prompt_ids(first, 16), _prompt_ids(first, prompt_tokens)
    out: dict = {f: {"weights": m.weights, "param_mib": m.param_bytes / 2**20}
                 for f, m in models.items()}
    if new_tokens:
        dec = _alternate(models, lambda m: m.generate_tokens([short], new_tokens,
                                                             ignore_eos=True), runs)
        for f, t in dec.items():
            out[f].update(tokens_per_s=new_tokens / min(t),
                          median_tokens_per_s=new_tokens / statistics.median(t))
    if prompt_tokens:
        ttft = _alternate(models, lambda m: m.generate_tokens([long], 1, ignore_eos=True),
                          runs)
        for f, t in ttft.items():
            out[f].update(ttft_s=min(t), median_ttft_s=statistics.median(t))
    for f, r in out.items():
        parts = [f"{model} {f} ({r['weights']}, {r['param_mib']:.1f} MiB):"]
        if "tokens_per_s" in r:
            parts.append(f"decode {r['tokens_per_s']:.1f} tokens/s (median "
                         f"{r['median_tokens_per_s']:.1f})")
        if "ttft_s" in r:
            parts.append(f"TTFT {len(long)} tokens {r['ttft_s']:.3f} s (median "
                         f"{r['median_ttft_s']:.3f})")
        log(" ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="f32,stored")
    ap.add_argument("--new-tokens", type=int, default=256, help="0: skip decode")
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="0: skip TTFT")
    ap.add_argument("--runs", type=int, default=8)
    args = ap.parse_args(argv)
    run(args.model, [f.strip() for f in args.formats.split(",")], new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens, runs=args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
