"""`spark bench decode`: decode speed, its roofline, long-context steps, TTFT, and the peer.

Every figure is measured in the same process on the same machine:
  1. tokens/s at batch 1 (16-token prompt, 256 new tokens, greedy, 128K-capacity cache);
  2. the roofline: parameter bytes over the GEMV bandwidth measured here;
  3. decode step time at filled positions 1K, 16K, 100K of a 128K cache (synthetic K/V),
     next to its bound (weights + K/V up to p) / GEMV bandwidth, and next to a memory-level
     bound: weights over the GEMV bandwidth plus K/V over the bandwidth of one streaming
     read of that many bytes (a long cache does not fit in the caches the GEMV runs from);
  4. time to first token for a 1,000-token prompt;
  5. batches of 1, 2, 4 and 8 sequences sharing each step (2K-capacity cache);
  6. Hugging Face transformers' generate() on the same weights (logits checked first).
Timings are the best of several runs after a warm-up (compilation excluded).
"""

from __future__ import annotations

import json
import time
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
    seconds = _best(lambda: m.generate_tokens([ids], new_tokens, ignore_eos=True), runs)
    return {"tokens_per_s": new_tokens / seconds, "ms_per_token": seconds / new_tokens * 1e3}


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


def run(m: SparkModel, *, runs: int = 5, with_peer: bool = True, log=print) -> dict:
    n_params = param_count(m.config)
    param_bytes = n_params * jnp.dtype(m.config.param_dtype).itemsize
    kv_per_pos = 2 * m.config.n_layers * m.config.n_kv_heads * m.config.head_dim * 4
    log(f"model: {n_params:,} parameters ({param_bytes / 2**20:.1f} MiB), "
        f"capacity {m.capacity:,} tokens, device {jax.devices()[0].platform}")
    bw = gemv_bandwidth(param_bytes, m.config.d_model)
    log(f"GEMV bandwidth: {bw / 1e9:.1f} GB/s")
    speed = decode_speed(m, runs)
    roof = bw / param_bytes
    log(f"decode batch 1: {speed['tokens_per_s']:.0f} tokens/s ({speed['ms_per_token']:.3f} "
        f"ms/token); roofline {roof:.0f} tokens/s -> {speed['tokens_per_s'] / roof:.0%}")
    fits = [p for p in POSITIONS if p + 64 <= m.capacity]
    stream = stream_bandwidth(kv_per_pos * max(fits)) if fits else None
    if stream:
        log(f"streaming read of {kv_per_pos * max(fits) / 2**20:,.0f} MiB (the K/V at "
            f"{max(fits):,}): {stream / 1e9:.1f} GB/s")
    step_ms, bound_ms, mem_bound_ms = {}, {}, {}
    for p in POSITIONS:
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
    t1000 = ttft(m)
    log(f"TTFT, 1,000-token prompt: {t1000 * 1e3:.1f} ms")
    batches = batch_scaling(m, runs)
    log("batches sharing a step (2K capacity, 128 new tokens): " + ", ".join(
        f"{b}: {r['ms_per_step']:.3f} ms/step, {r['tokens_per_s']:,.0f} tokens/s"
        for b, r in batches.items()))
    out = {"params": n_params, "param_bytes": param_bytes, "gemv_gb_per_s": bw / 1e9,
           **speed, "roofline_tokens_per_s": roof,
           "roofline_fraction": speed["tokens_per_s"] / roof,
           "step_ms_at": step_ms, "step_bound_ms_at": bound_ms,
           "stream_gb_per_s": stream / 1e9 if stream else None,
           "step_memory_bound_ms_at": mem_bound_ms, "ttft_1000_s": t1000,
           "batch_scaling": batches,
           "hf_tokens_per_s": None, "ratio_vs_hf": None, "capacity": m.capacity,
           "device": jax.devices()[0].device_kind}
    if with_peer:
        p = peer(m, runs=min(runs, 3))
        if "skipped" in p:
            log(f"peer: skipped ({p['skipped']})")
            out["hf_skipped"] = p["skipped"]
        else:
            out["hf_tokens_per_s"] = p["tokens_per_s"]
            out["ratio_vs_hf"] = speed["tokens_per_s"] / p["tokens_per_s"]
            out["hf_max_abs_logit_diff"] = p["max_abs_logit_diff"]
            log(f"peer (transformers generate, {p['threads']} threads): "
                f"{p['tokens_per_s']:.0f} tokens/s; logits agree to {p['max_abs_logit_diff']:.1e}; "
                f"ours/theirs = {out['ratio_vs_hf']:.1f}x "
                f"({p['greedy_tokens_agreeing']}/256 greedy tokens identical)")
    return out


def main(checkpoint: str | None, json_path: str | None, runs: int, with_peer: bool) -> int:
    import spark_model

    m = spark_model.load(checkpoint)
    out = run(m, runs=runs, with_peer=with_peer)
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
        print(f"wrote {json_path}")
    return 0
