"""llama.cpp (llama-cpp-python) timed on a GGUF file, in a process of its own.

`spark bench decode` runs this as a child process so that llama.cpp's resident memory is its
own, not mixed with Spark's, and so that both engines get the same thread count without
sharing a process. The spec arrives as JSON on stdin; the result leaves as JSON on stdout:

  spec:   {"gguf", "threads", "runs", "prompt": ids, "new_tokens", "ttft_prompt": ids,
           "agree_seq": ids (may be empty)}
  result: {"peer": {"name", "version"}, "tokens_per_s", "tokens": the first run's greedy ids,
           "ttft_s", "rss_mb", "agree_top1": llama.cpp's argmax at each position of
           agree_seq}

Greedy decoding is llama.cpp's own sampler at temperature 0 (top-1), end ids ignored.
Timings are the best of `runs` after one warm-up run, as for Spark.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def rss_mb() -> float | None:
    """This process's resident memory now (VmRSS), in MiB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()  # else generate() reuses the cached prefix and skips the prompt
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def _best(fn, runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(spec: dict) -> dict:
    import llama_cpp

    prompt, ttft_prompt, agree = spec["prompt"], spec["ttft_prompt"], spec["agree_seq"]
    n_ctx = max(len(prompt) + spec["new_tokens"], len(ttft_prompt) + 1, 512) + 8
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    result: dict = {"peer": {"name": "llama.cpp (llama-cpp-python)",
                             "version": llama_cpp.__version__}}
    tokens: list[int] = []

    def decode() -> None:
        tokens[:] = _greedy(llm, prompt, spec["new_tokens"])

    seconds = _best(decode, spec["runs"])
    result["tokens"] = list(tokens)
    result["tokens_per_s"] = spec["new_tokens"] / seconds

    def first_token() -> None:
        _greedy(llm, ttft_prompt, 1)

    result["ttft_s"] = _best(first_token, spec["runs"])
    result["rss_mb"] = rss_mb()
    del llm
    if agree:
        llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=len(agree) + 8, logits_all=True,
                              n_threads=spec["threads"], n_threads_batch=spec["threads"],
                              verbose=False)
        llm.eval(agree)
        result["agree_top1"] = np.asarray(llm.scores[:len(agree)]).argmax(-1).tolist()
    return result


def main() -> int:
    json.dump(run(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
