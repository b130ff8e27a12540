"""`spark bench decode`: decode speed, its roofline, long-context steps, TTFT, and the peers.

Every figure is measured in the same run on the same machine:
  1. tokens/s at batch 1 (16-token prompt, 256 new tokens, greedy, 128K-capacity cache);
  2. the roofline: parameter bytes as held (packed weights at their block sizes, scales
     included) over the GEMV bandwidth measured here;
  3. decode step time at filled positions 1K, 16K, 100K of a 128K cache (synthetic K/V),
     next to its bound (weights + K/V up to p) / GEMV bandwidth, and next to a memory-level
     bound: weights over the GEMV bandwidth plus K/V over the bandwidth of one streaming
     read of that many bytes (a long cache does not fit in the caches the GEMV runs from);
  4. time to first token for a 1,000-token prompt, and resident memory;
  5. batches of 1, 2, 4 and 8 sequences sharing each step (2K-capacity cache);
  6. llama.cpp (llama-cpp-python, in a child process with the same thread count) on the
     same weights: the model's own GGUF file when Spark runs it as stored, else the GGUF
     `spark export` writes for Spark's weights (packed tensors as they are): tokens/s for
     the same 256 greedy tokens, TTFT for the same prompt, its resident memory, top-1
     agreement with Spark's full forward over 1,024 positions of held-out code, and where
     the greedy continuations first differ;
  7. Hugging Face transformers' generate() on the same weights (logits checked first;
     float weights only).
Timings are the best of several runs after a warm-up (compilation excluded).

`--weights FORMAT` runs the model with its weight matrices in that format
(spark_model/packing.py). A GGUF file whose file type is that format runs as stored (e.g.
SmolLM2's Q4_1 file, whose embedding is Q8_0); a packed source narrower than the format
asked for (a Q4_1 file asked for q8_0) is dequantized and requantized, and the JSON says so
(`weights_note`): the speed is the format's, the precision no better than the source's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spark_model import engine, generation
from spark_model.api import SparkModel
from spark_model.kv_cache import KVCache
from spark_model.transformer import param_count

POSITIONS = (1024, 16_384, 100_000)


def _best(fn, runs: int) -> float:
    fn()  # warm-up: compilation and first-touch allocation
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemv_bandwidth(n_bytes: int, width: int, runs: int = 5, iters: int = 200) -> float:
    """Bytes/s of a chain of f32 matrix-vector products over a matrix of `n_bytes`.

    Both orientations the model uses are timed (x @ W with W (D, n) as in the blocks, and
    W @ x with W (n, D) as in the tied output projection); the faster one sets the bound.
    """
    cols = max(1, n_bytes // 4 // width)
    w = jax.random.normal(jax.random.key(0), (width, cols), jnp.float32) * 1e-3
    x = jnp.ones((1, width), jnp.float32)

    @jax.jit
    def chain_xw(w, x):
        return jax.lax.fori_loop(0, iters, lambda i, x: x + (x @ w)[:, :width] * 1e-6, x)

    @jax.jit
    def chain_wx(wt, x):
        return jax.lax.fori_loop(
            0, iters, lambda i, x: x + jnp.einsum("nd,bd->bn", wt, x)[:, :width] * 1e-6, x)

    wt = jnp.asarray(w.T)
    best = min(_best(lambda: chain_xw(w, x).block_until_ready(), runs),
               _best(lambda: chain_wx(wt, x).block_until_ready(), runs))
    return iters * w.size * 4 / best


def stream_bandwidth(n_bytes: int, runs: int = 5) -> float:
    """Bytes/s of one jitted sum over an f32 array of `n_bytes` (on all intra-op threads)."""
    x = jnp.ones((max(1, n_bytes // 4),), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = _best(lambda: total(x).block_until_ready(), runs)
    return x.size * 4 / seconds


def _prompt_ids(m: SparkModel, n: int) -> list[int]:
    """n real code tokens (BOS first), cut from the standard library's own source."""
    import inspect
    import typing

    text = inspect.getsource(typing) * 4
    return m.tokenizer.encode(text, bos=True)[:n]


def decode_speed(m: SparkModel, runs: int, new_tokens: int = 256) -> dict:
    ids = _prompt_ids(m, 16)
    out: list[list[int]] = []
    seconds = _best(lambda: out.append(m.generate_tokens([ids], new_tokens,
                                                         ignore_eos=True)[0]), runs)
    return {"tokens_per_s": new_tokens / seconds, "ms_per_token": seconds / new_tokens * 1e3,
            "prompt": ids, "tokens": out[0]}


def step_time_at(m: SparkModel, position: int, steps: int = 32, runs: int = 3) -> float:
    """Seconds per decode step starting at `position`, over a synthetically filled cache."""
    if position + steps + 1 > m.capacity:
        raise ValueError(f"position {position} does not fit capacity {m.capacity}")
    cfg = m.config
    keys = jax.random.split(jax.random.key(1), 2 * cfg.n_layers)
    shape = (1, cfg.n_kv_heads, m.capacity_allocated, cfg.head_dim)  # (B, K, S, H)
    fill = [jax.random.normal(k, shape, jnp.float32) for k in keys]
    m.drop_cache()  # make room: the synthetic cache replaces the model's own
    req = generation.check_request("", max_new_tokens=steps + 1, temperature=0.0, top_k=0,
                                   top_p=1.0, seed=0, stop=None)
    consts = generation.constants(req, 1, m.token_table, m.end_id_vector(ignore_eos=True))
    state = engine.DecodeState(
        cache=KVCache(k=tuple(fill[:cfg.n_layers]), v=tuple(fill[cfg.n_layers:])),
        tokens_bn=jnp.zeros((1, engine.bucket(steps + 1)), jnp.int32),
        count_b=jnp.ones((1,), jnp.int32), last_b=jnp.full((1,), 5, jnp.int32),
        position_b=jnp.full((1,), position, jnp.int32), done_b=jnp.zeros((1,), bool),
        tail_bm=jnp.full((1, consts.stop_spec.bytes_sm.shape[1]), -1, jnp.int16),
        step=jnp.ones((), jnp.int32))
    limit = jnp.asarray(steps + 1, jnp.int32)
    holder = {"state": state}

    def once():
        # The donated state comes back; rewind its counters so each run decodes the same
        # `steps` positions over the same filled cache.
        s = engine.decode_jit(m.graphdef, m.params, holder["state"], consts, limit)
        s.step.block_until_ready()
        holder["state"] = s.replace(step=jnp.ones((), jnp.int32), count_b=jnp.ones((1,), jnp.int32),
                                    position_b=jnp.full((1,), position, jnp.int32),
                                    done_b=jnp.zeros((1,), bool))

    seconds = _best(once, runs)
    del holder, state, fill
    return seconds / steps


def batch_scaling(m: SparkModel, runs: int, batches=(1, 2, 4, 8), capacity: int = 2048,
                  new_tokens: int = 128) -> dict:
    """ms per step and tokens/s when `b` sequences (16-token prompts) share each step."""
    small = SparkModel(m.model, m.tokenizer, m.path, capacity=capacity)
    ids = _prompt_ids(m, 16)
    out = {}
    for b in batches:
        seconds = _best(lambda: small.generate_tokens([ids] * b, new_tokens, ignore_eos=True),
                        runs)
        out[str(b)] = {"ms_per_step": seconds / new_tokens * 1e3,
                       "tokens_per_s": b * new_tokens / seconds}
    return out


def ttft(m: SparkModel, prompt_tokens: int = 1000, runs: int = 5) -> float:
    ids = _prompt_ids(m, prompt_tokens)
    return _best(lambda: m.generate_tokens([ids], 1, ignore_eos=True), runs)


def threads() -> int:
    """The CPUs this process may run on: XLA's intra-op pool size, given to llama.cpp too."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def llama_cpp_peer(m: SparkModel, gguf: Path | None, *, runs: int, prompt: list[int],
                   new_tokens: int, ttft_tokens: int, agree_positions: int,
                   n_threads: int) -> dict:
    """llama.cpp on `gguf` (or on the GGUF export of m's weights when None), in a child
    process (eval/llama_cpp_peer.py); {"skipped": why} when llama-cpp-python is missing."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (pip install -e '.[bench]')"}
    agree = _prompt_ids(m, agree_positions) if agree_positions else []
    with tempfile.TemporaryDirectory(prefix="spark-bench-decode-") as tmp:
        if gguf is None:
            from spark_model.formats.export import export

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tokenizer caveats: ids are fed directly
                gguf = export(m, "gguf", Path(tmp) / "model.gguf")
            exported = True
        else:
            exported = False
        spec = {"gguf": str(gguf), "threads": n_threads, "runs": runs, "prompt": prompt,
                "new_tokens": new_tokens, "ttft_prompt": _prompt_ids(m, ttft_tokens),
                "agree_seq": agree}
        res = subprocess.run([sys.executable, "-m", "eval.llama_cpp_peer"],
                             input=json.dumps(spec), capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    if res.returncode != 0:
        why = res.stderr.strip()[-800:] or res.stdout.strip()[-800:] or "no output"
        raise RuntimeError(f"the llama.cpp peer failed (exit status {res.returncode}): {why}")
    out = json.loads(res.stdout)
    out["gguf"] = "exported from Spark's weights" if exported else str(gguf)
    if agree:
        ours = np.asarray(m.logits(np.asarray([agree]))[0]).argmax(-1)
        out["top1_agreement"] = float(np.mean(ours == np.asarray(out.pop("agree_top1"))))
        out["agreement_positions"] = len(agree)
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def rss_mb() -> float | None:
    from eval.llama_cpp_peer import rss_mb as current

    return current()


def peer(m: SparkModel, runs: int, new_tokens: int = 256) -> dict:
    from eval import hf_peer

    why = hf_peer.available()
    if why:
        return {"skipped": why}
    import torch

    hf = hf_peer.to_hf(m.model)
    ids = _prompt_ids(m, 16)
    check = np.asarray(_prompt_ids(m, 64))[None]
    diff = float(np.abs(hf_peer.logits(hf, check) - np.asarray(m.logits(check))).max())
    if diff > 1e-3:
        raise RuntimeError(f"the peer's logits differ from ours by {diff}: export is wrong")
    res = hf_peer.time_generate(hf, ids, new_tokens, runs=runs)
    ours = m.generate_tokens([ids], new_tokens, ignore_eos=True)[0]
    same = sum(a == b for a, b in zip(ours, res["ids"]))
    return {"tokens_per_s": res["tokens_per_s"], "max_abs_logit_diff": diff,
            "greedy_tokens_agreeing": same, "threads": torch.get_num_threads()}


def run(m: SparkModel, *, runs: int = 5, with_peer: bool = True, log=print,
        new_tokens: int = 256, ttft_tokens: int = 1000, agree_positions: int = 1024,
        positions=POSITIONS, batches=(1, 2, 4, 8), gguf: Path | None = None) -> dict:
    """Every figure for the loaded model `m` (see the module docstring). `gguf`: a file
    holding exactly m's weights for the llama.cpp peer (else it runs on m's export); the
    sizes are parameters so that a test can run the whole benchmark small."""
    n_params = param_count(m.config)
    param_bytes = m.param_bytes
    weights = m.weights
    n_threads = threads()
    kv_per_pos = 2 * m.config.n_layers * m.config.n_kv_heads * m.config.head_dim * 4
    log(f"model: {n_params:,} parameters, weights {weights} ({param_bytes / 2**20:.1f} MiB), "
        f"capacity {m.capacity:,} tokens, device {jax.devices()[0].platform}, "
        f"{n_threads} threads")
    bw = gemv_bandwidth(param_bytes, m.config.d_model)
    log(f"GEMV bandwidth: {bw / 1e9:.1f} GB/s")
    speed = decode_speed(m, runs, new_tokens)
    rss = rss_mb()
    roof = bw / param_bytes
    log(f"decode batch 1: {speed['tokens_per_s']:.0f} tokens/s ({speed['ms_per_token']:.3f} "
        f"ms/token); roofline {roof:.0f} tokens/s -> {speed['tokens_per_s'] / roof:.0%}; "
        f"resident memory {rss or float('nan'):,.0f} MiB")
    fits = [p for p in positions if p + 64 <= m.capacity]
    stream = stream_bandwidth(kv_per_pos * max(fits)) if fits else None
    if stream:
        log(f"streaming read of {kv_per_pos * max(fits) / 2**20:,.0f} MiB (the K/V at "
            f"{max(fits):,}): {stream / 1e9:.1f} GB/s")
    step_ms, bound_ms, mem_bound_ms = {}, {}, {}
    for p in positions:
        if p not in fits:
            log(f"step at {p}: skipped (capacity {m.capacity})")
            continue
        step_ms[str(p)] = step_time_at(m, p) * 1e3
        bound_ms[str(p)] = (param_bytes + kv_per_pos * p) / bw * 1e3
        mem_bound_ms[str(p)] = (param_bytes / bw + kv_per_pos * p / stream) * 1e3
        log(f"step at position {p:>7,}: {step_ms[str(p)]:.3f} ms, bound "
            f"{bound_ms[str(p)]:.3f} ms (x{step_ms[str(p)] / bound_ms[str(p)]:.2f}); "
            f"memory-level bound {mem_bound_ms[str(p)]:.3f} ms "
            f"(x{step_ms[str(p)] / mem_bound_ms[str(p)]:.2f})")
    t1000 = ttft(m, ttft_tokens, runs)
    log(f"TTFT, {ttft_tokens:,}-token prompt: {t1000 * 1e3:.1f} ms")
    scaling = batch_scaling(m, runs, batches) if batches else {}
    if scaling:
        log("batches sharing a step (2K capacity, 128 new tokens): " + ", ".join(
            f"{b}: {r['ms_per_step']:.3f} ms/step, {r['tokens_per_s']:,.0f} tokens/s"
            for b, r in scaling.items()))
    out = {"params": n_params, "param_bytes": param_bytes, "weights": weights,
           "gemv_gb_per_s": bw / 1e9,
           "tokens_per_s": speed["tokens_per_s"], "ms_per_token": speed["ms_per_token"],
           "roofline_tokens_per_s": roof,
           "roofline_fraction": speed["tokens_per_s"] / roof,
           "step_ms_at": step_ms, "step_bound_ms_at": bound_ms,
           "stream_gb_per_s": stream / 1e9 if stream else None,
           "step_memory_bound_ms_at": mem_bound_ms, "ttft_1000_s": t1000,
           "ttft_prompt_tokens": ttft_tokens, "rss_mb": rss, "threads": n_threads,
           "new_tokens": new_tokens, "batch_scaling": scaling,
           "peer": None, "peer_tokens_per_s": None, "ratio_vs_peer": None,
           "peer_ttft_1000_s": None, "peer_rss_mb": None,
           "hf_tokens_per_s": None, "ratio_vs_hf": None, "capacity": m.capacity,
           "device": jax.devices()[0].device_kind}
    if not with_peer:
        return out
    p = llama_cpp_peer(m, gguf, runs=runs, prompt=speed["prompt"], new_tokens=new_tokens,
                       ttft_tokens=ttft_tokens, agree_positions=agree_positions,
                       n_threads=n_threads)
    if "skipped" in p:
        log(f"llama.cpp: skipped ({p['skipped']})")
        out["peer_skipped"] = p["skipped"]
    else:
        diff = _first_difference(speed["tokens"], p["tokens"])
        out.update(peer=p["peer"], peer_gguf=p["gguf"], peer_tokens_per_s=p["tokens_per_s"],
                   ratio_vs_peer=speed["tokens_per_s"] / p["tokens_per_s"],
                   peer_ttft_1000_s=p["ttft_s"], ttft_ratio_vs_peer=t1000 / p["ttft_s"],
                   peer_rss_mb=p["rss_mb"], greedy_first_difference=diff,
                   top1_agreement=p.get("top1_agreement"),
                   agreement_positions=p.get("agreement_positions"))
        if diff is not None:
            tok = m.tokenizer
            out["greedy_texts_at_difference"] = {
                "common": tok.decode(speed["tokens"][:diff], errors="replace")[-80:],
                "spark": tok.decode(speed["tokens"][diff:diff + 8], errors="replace"),
                "peer": tok.decode(p["tokens"][diff:diff + 8], errors="replace")}
        log(f"llama.cpp {p['peer']['version']} on {p['gguf']}, {n_threads} threads: "
            f"{p['tokens_per_s']:.0f} tokens/s (ours/theirs = {out['ratio_vs_peer']:.2f}x); "
            f"TTFT {p['ttft_s'] * 1e3:.1f} ms (ours/theirs = {out['ttft_ratio_vs_peer']:.2f}); "
            f"resident memory {p['rss_mb'] or float('nan'):,.0f} MiB")
        log(f"  greedy {new_tokens} tokens: " + ("identical" if diff is None else
                                                  f"first difference at token {diff}")
            + (f"; top-1 agreement with Spark's forward over {out['agreement_positions']} "
               f"positions: {out['top1_agreement']:.4f}" if out["top1_agreement"] is not None
               else ""))
    if weights != "f32":
        out["hf_skipped"] = "transformers runs float weights only"
        log("transformers: skipped (packed weights)")
        return out
    hf = peer(m, runs=min(runs, 3), new_tokens=new_tokens)
    if "skipped" in hf:
        log(f"transformers: skipped ({hf['skipped']})")
        out["hf_skipped"] = hf["skipped"]
    else:
        out["hf_tokens_per_s"] = hf["tokens_per_s"]
        out["ratio_vs_hf"] = speed["tokens_per_s"] / hf["tokens_per_s"]
        out["hf_max_abs_logit_diff"] = hf["max_abs_logit_diff"]
        log(f"transformers generate ({hf['threads']} threads): "
            f"{hf['tokens_per_s']:.0f} tokens/s; logits agree to {hf['max_abs_logit_diff']:.1e}; "
            f"ours/theirs = {out['ratio_vs_hf']:.1f}x "
            f"({hf['greedy_tokens_agreeing']}/{new_tokens} greedy tokens identical)")
    return out


def load_for_bench(model: str | None, weights: str | None, log=print
                   ) -> tuple[SparkModel, Path | None, str | None]:
    """(the model in `weights`, a GGUF file holding exactly its weights or None, a note).

    A GGUF file whose file type is `weights` (or any, when weights is None) runs as stored,
    and is then the peer's file. A packed source narrower than `weights` goes through f32
    (noted): widening is refused everywhere else, but a speed benchmark may ask for it.
    """
    import spark_model
    from spark_model import checkpoint, packing
    from spark_model.formats import detect
    from spark_model.formats.mapping import FormatError

    path = detect.resolve(model) if model is not None else None
    kind = detect.detect(path) if path is not None else "checkpoint"
    if kind == "gguf":
        from spark_model.formats.gguf import read_gguf_metadata

        import gguf as gguflib

        try:
            file_type = gguflib.LlamaFileType(read_gguf_metadata(path).get("general.file_type"))
        except ValueError:
            file_type = None
        own = {gguflib.LlamaFileType.MOSTLY_Q8_0: "q8_0", gguflib.LlamaFileType.MOSTLY_Q4_0:
               "q4_0", gguflib.LlamaFileType.MOSTLY_Q4_1: "q4_1"}.get(file_type)
        if weights is None or weights == own:
            m = spark_model.load(path)
            if "converted" not in m.source_info:
                return m, path, None
            return m, None, f"converted on import: {m.source_info['converted']}"
    try:
        return spark_model.load(path, weights=weights), None, None
    except (packing.QuantError, FormatError, checkpoint.CheckpointError) as e:
        if "wider" not in str(e):
            raise
    base = spark_model.load(path, weights="f32")
    m = SparkModel(packing.convert_model(base.model, weights), base.tokenizer, base.path)
    m.source_info = base.source_info
    note = (f"{weights} from the dequantized weights of a narrower source (speed of "
            f"{weights}, precision of the source)")
    log(f"note: {note}")
    return m, None, note


def main(checkpoint: str | None, json_path: str | None, runs: int, with_peer: bool,
         weights: str | None = None) -> int:
    m, gguf, note = load_for_bench(checkpoint, weights)
    out = run(m, runs=runs, with_peer=with_peer, gguf=gguf)
    out["weights_requested"] = weights
    if note:
        out["weights_note"] = note
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
        print(f"wrote {json_path}")
    return 0
