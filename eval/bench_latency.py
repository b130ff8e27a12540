"""`spark bench latency`: latency where coding assistants spend it, section by section.

Each model is served by `spark serve` in a separate process on loopback (as `spark bench
serve` starts it), with its prefix cache on, and measured from the client side. Sections
live in SECTIONS, a registry of name -> (what it measures, function); a function takes a
`Run` and returns a JSON-able dict. Implemented:

  prefix_reuse  a 2,000-token shared prefix of held-out code plus a 20-token new suffix:
                time to first token over the WebSocket when the prefix is new (cold) and
                when an earlier request sent it (warm, served from the prefix cache).
                Target: warm at most 10% of cold.
  infill        an /infill request (llama.cpp's format) for a one-line fill in held-out
                code: time to first token and total latency, streamed. Not applicable to a
                model whose vocabulary has no fill-in-the-middle tokens (the server's 400
                is reported as such).

  edit_workload, fresh_code  prompt-lookup speculative decoding against plain decoding
                (eval/bench_speculative.py): these run the model in this process, since
                the server does not speculate yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import websockets

from eval import bench_speculative
from eval.bench_serve import _free_port, _start_server, _stopped

PREFIX_TOKENS = 2000
SUFFIX_TOKENS = 20
NEW_TOKENS = 8  # generated per prefix-reuse request (only the first one is timed)
FILL_TOKENS = 48  # at most, per infill request (a one-line fill stops at the newline)
CAPACITY = 4096
PREFIX_CACHE_MB = 512  # room for a few 2,000-token prefixes of a 30-layer model
TARGET_WARM_VS_COLD = 0.10


@dataclasses.dataclass
class Run:
    """What a section gets: the model's name, its tokenizer, the server's port, how many
    timed repetitions to make, and held-out code to build prompts from (file texts)."""

    model: str
    tokenizer: object
    port: int
    runs: int
    code: list[str]

    def ids(self, n: int) -> list[int]:
        """The first n or more token ids of the code, file by file (a file this vocabulary
        cannot encode, such as one with a byte SmolLM2 lacks, is skipped)."""
        out: list[int] = []
        for text in self.code:
            try:
                out += self.tokenizer.encode(text)
            except ValueError:
                continue
            if len(out) >= n:
                return out
        raise ValueError(f"the held-out code has {len(out)} tokens this model can encode; "
                         f"{n} are needed")


# ---- prefix reuse ----------------------------------------------------------------------

def _windows(run: Run, n: int) -> list[tuple[str, list[str]]]:
    """n (prefix, suffixes) from consecutive stretches of the held-out code: each prefix
    PREFIX_TOKENS tokens, then two suffixes of SUFFIX_TOKENS tokens from just after it."""
    tok = run.tokenizer
    step = PREFIX_TOKENS + 4 * SUFFIX_TOKENS
    ids = run.ids(n * step)
    out = []
    for k in range(n):
        at = k * step
        prefix = tok.decode(ids[at:at + PREFIX_TOKENS], errors="replace")
        tails = [tok.decode(ids[s:s + SUFFIX_TOKENS], errors="replace")
                 for s in (at + PREFIX_TOKENS + SUFFIX_TOKENS,
                           at + PREFIX_TOKENS + 3 * SUFFIX_TOKENS)]
        out.append((prefix, tails))
    return out


async def _ttft(ws, rid: int, prompt: str) -> dict:
    """Send one request; the client-side time to its first text, and the server's report."""
    from eval.bench_serve import ws_round_trip

    first, frame = await ws_round_trip(ws, {"type": "request", "id": rid, "prompt": prompt,
                                            "max_tokens": NEW_TOKENS, "temperature": 0,
                                            "ignore_eos": True})
    return {"ttft_ms": first * 1e3,
            "server_ttft_ms": frame["ttft_ms"], "prompt_tokens": frame["usage"]["prompt_tokens"],
            "cached_tokens": frame["usage"]["prompt_tokens_details"]["cached_tokens"]}


def prefix_reuse(run: Run) -> dict:
    windows = _windows(run, run.runs + 1)

    async def measure():
        async with websockets.connect(f"ws://127.0.0.1:{run.port}/v1/ws",
                                      compression=None, max_size=1 << 22) as ws:
            pairs = []
            for k, (prefix, (tail_a, tail_b)) in enumerate(windows):
                cold = await _ttft(ws, 2 * k, prefix + tail_a)
                warm = await _ttft(ws, 2 * k + 1, prefix + tail_b)
                if k:  # the first pair compiles the programs these lengths need
                    pairs.append((cold, warm))
            return pairs

    pairs = asyncio.run(measure())
    cold = [c["ttft_ms"] for c, _ in pairs]
    warm = [w["ttft_ms"] for _, w in pairs]
    ratio = statistics.median(warm) / statistics.median(cold)
    return {"prefix_tokens": PREFIX_TOKENS, "suffix_tokens": SUFFIX_TOKENS,
            "prompt_tokens": [w["prompt_tokens"] for _, w in pairs],
            "cached_tokens_warm": [w["cached_tokens"] for _, w in pairs],
            "cached_tokens_cold": [c["cached_tokens"] for c, _ in pairs],
            "cold_ttft_ms": cold, "warm_ttft_ms": warm,
            "cold_ttft_median_ms": statistics.median(cold),
            "warm_ttft_median_ms": statistics.median(warm),
            "server_cold_ttft_median_ms": statistics.median(c["server_ttft_ms"]
                                                            for c, _ in pairs),
            "server_warm_ttft_median_ms": statistics.median(w["server_ttft_ms"]
                                                            for _, w in pairs),
            "warm_vs_cold": ratio, "target": TARGET_WARM_VS_COLD,
            "met": ratio <= TARGET_WARM_VS_COLD}


# ---- infilling round trip --------------------------------------------------------------

HOLE_BEFORE, HOLE_AFTER = 160, 48  # tokens of code around each hole (one prompt bucket)


def _holes(run: Run, n: int) -> list[tuple[str, str, str]]:
    """n one-line holes in the held-out code: (prefix, suffix, the removed line), each a
    non-blank indented line with about HOLE_BEFORE tokens of code before it (from a line
    start) and HOLE_AFTER after it, so every prompt is about as long (one compiled size)."""
    tok = run.tokenizer
    lines = "\n".join(run.code).split("\n")
    out = []
    for i in range(40, len(lines) - 10, 97):
        line = lines[i]
        if not line.startswith("    ") or len(line.strip()) <= 8:
            continue
        try:
            before = tok.encode("\n".join(lines[i - 40:i]) + "\n")
            after = tok.encode("\n" + "\n".join(lines[i + 1:i + 12]) + "\n")
        except ValueError:  # a character this vocabulary cannot encode
            continue
        head = tok.decode(before[-HOLE_BEFORE:], errors="replace")
        head = head[head.find("\n") + 1:]  # from a line start
        indent = line[:len(line) - len(line.lstrip())]
        out.append((head + indent, tok.decode(after[:HOLE_AFTER], errors="replace"),
                    line.strip()))
        if len(out) == n:
            return out
    raise ValueError(f"the held-out code has fewer than {n} holes")


def _infill_once(port: int, prefix: str, suffix: str) -> dict:
    body = json.dumps({"input_prefix": prefix, "input_suffix": suffix,
                       "n_predict": FILL_TOKENS, "temperature": 0, "stop": ["\n"],
                       "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/infill", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"status": r.status, "error": json.loads(r.read())["error"]}
        first, text, final = None, "", None
        while final is None:
            line = r.readline()
            if not line:
                raise RuntimeError("the /infill stream ended without its final event")
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") and first is None:
                first = time.perf_counter() - t0
            text += event.get("content", "")
            if event.get("stop"):
                final = event
        total = time.perf_counter() - t0
    finally:
        conn.close()
    return {"status": 200, "ttft_ms": (first if first is not None else total) * 1e3,
            "total_ms": total * 1e3, "text": text, "tokens_predicted": final["tokens_predicted"],
            "tokens_evaluated": final["tokens_evaluated"], "stop_type": final["stop_type"]}


def infill(run: Run) -> dict:
    holes = _holes(run, run.runs + 1)
    probe = _infill_once(run.port, *holes[0][:2])  # also compiles
    if probe["status"] != 200:
        if probe["error"].get("code") != "no_fim_tokens":
            raise RuntimeError(f"/infill answered {probe['status']}: {probe['error']}")
        return {"applicable": False, "status": probe["status"],
                "reason": probe["error"]["message"]}
    results = [dict(_infill_once(run.port, p, s), line=line) for p, s, line in holes[1:]]
    ttft = [r["ttft_ms"] for r in results]
    total = [r["total_ms"] for r in results]
    return {"applicable": True, "requests": len(results),
            "ttft_median_ms": statistics.median(ttft), "total_median_ms": statistics.median(total),
            "ttft_ms": ttft, "total_ms": total,
            "prompt_tokens": [r["tokens_evaluated"] for r in results],
            "tokens_predicted": [r["tokens_predicted"] for r in results],
            "exact_lines": sum(r["text"].strip() == r["line"] for r in results)}


# ---- the registry ----------------------------------------------------------------------

SECTIONS: dict[str, tuple[str, Callable[[Run], dict]]] = {
    "edit_workload": ("effective tokens/s with and without speculation on edit prompts",
                      bench_speculative.edit_workload),
    "fresh_code": ("slowdown from speculation on HumanEval prompts",
                   bench_speculative.fresh_code),
    "prefix_reuse": ("TTFT cold vs warm for a 2,000-token shared prefix + 20 new tokens",
                     prefix_reuse),
    "infill": ("/infill time to first token and total latency for a one-line fill", infill),
}


def default_models() -> list[str | None]:
    """The shipped checkpoint, and smollm2-135m when it has been fetched."""
    from spark_model import registry

    out: list[str | None] = [None]
    try:
        registry.resolve("smollm2-135m")
        out.append("smollm2-135m")
    except (registry.RegistryError, FileNotFoundError):  # unknown, or not fetched
        pass
    return out


def held_out_code() -> list[str]:
    """The texts of the standard library's held-out files (never in the default training)."""
    from train.corpus import validation_files

    return [p.read_text(encoding="utf-8", errors="replace") for p in validation_files()]


def bench_model(model: str | None, sections: list[str], runs: int, code: list[str]) -> dict:
    import spark_model

    tokenizer = spark_model.load(model, capacity=256).tokenizer
    port = _free_port()
    cmd = [sys.executable, "-m", "spark_model.cli", "serve", "--port", str(port),
           "--max-batch", "4", "--capacity", str(CAPACITY), "--prefix-cache-mb",
           str(PREFIX_CACHE_MB), "--log-level", "warning"]
    cmd += ["--checkpoint", model] if model else []
    t0 = time.perf_counter()
    proc = _start_server(cmd, port)
    up = time.perf_counter() - t0
    print(f"{model or 'spark-tiny'}: server up on 127.0.0.1:{port} in {up:.1f} s", flush=True)
    out: dict = {"server_start_s": up}
    try:
        run = Run(model or "spark-tiny", tokenizer, port, runs, code)
        for name in sections:
            what, fn = SECTIONS[name]
            out[name] = fn(run)
            print(f"  {name}: {_summary(out[name])}", flush=True)
    finally:
        _stopped(proc)
    return out


def _summary(r: dict) -> str:
    if "speedup" in r:
        return bench_speculative.summary(r)
    if "warm_vs_cold" in r:
        return (f"TTFT cold {r['cold_ttft_median_ms']:.1f} ms, warm "
                f"{r['warm_ttft_median_ms']:.1f} ms (median of {len(r['cold_ttft_ms'])}): "
                f"warm = {r['warm_vs_cold']:.1%} of cold (target <= "
                f"{r['target']:.0%}: {'met' if r['met'] else 'MISSED'}); reused "
                f"{r['cached_tokens_warm']} of {r['prompt_tokens']} prompt tokens")
    if not r.get("applicable", True):
        return f"not applicable: {r['reason']}"
    return (f"TTFT {r['ttft_median_ms']:.1f} ms, total {r['total_median_ms']:.1f} ms "
            f"(median of {r['requests']}; prompts of {min(r['prompt_tokens'])}-"
            f"{max(r['prompt_tokens'])} tokens, {r['exact_lines']} of {r['requests']} lines "
            f"exact)")


def main(models: list[str | None] | None = None, json_path: str | None = None,
         runs: int = 5, sections: list[str] | None = None) -> int:
    sections = list(SECTIONS) if sections is None else sections
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; sections: "
                         f"{', '.join(SECTIONS)}")
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    models = default_models() if models is None else models
    code = held_out_code()
    report = {"runs": runs, "sections": sections, "models": {}}
    for model in models:
        report["models"][model or "spark-tiny"] = bench_model(model, sections, runs, code)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0
