"""Does the model use its context? Bits per byte of fixed code given more and more before it.

Each source is one repository-level sequence: its files in sorted path order, each
introduced by a `# file: <path relative to the source root>` line. The target is the
sequence's last `target_bytes` (cut at a line start); it is scored given the C tokens
that precede it, for C in `lengths` (default 512, 2K, 8K, 32K, 128K), so every point of
the curve scores the same bytes and only the context differs. A model that uses its
context shows a falling curve. The 128K point is capped so BOS, context and target fit
in the model's max_seq_len; a source shorter than C tokens leaves that point out.

Scoring runs through the model's memory-lean `nll` (blockwise attention, chunked logits),
so a 128K window fits in memory; results are appended to `context_results.jsonl` per
(source, length) and reused on a rerun with the same model and target.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from eval.bpb import token_nll
from eval.sources import default_code

RESULTS_FILE = "context_results.jsonl"
DEFAULT_LENGTHS = (512, 2048, 8192, 32768, 131072)
DEFAULT_TARGET_BYTES = 4096


class ContextCurveError(ValueError):
    """Sources or settings the context curve cannot use."""


def sequence_text(files: Sequence[str | Path], root: str | Path) -> str:
    """The files in sorted path order, each introduced by its path relative to `root`."""
    parts = []
    for path in sorted(Path(f) for f in files):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable files are left out, as in training
        parts.append(f"# file: {path.relative_to(root).as_posix()}\n{text}")
        if not text.endswith("\n"):
            parts.append("\n")
    return "".join(parts)


def default_sources() -> dict[str, str]:
    """One sequence per source of the default code (`eval.sources`): held-out stdlib files,
    and pytest's source (outside the training corpus)."""
    return {name: sequence_text(files, root) for name, (files, root) in default_code().items()}


def split_target(text: str, target_bytes: int) -> tuple[str, str]:
    """(context, target): the target is the last `target_bytes` or so, from a line start."""
    data = text.encode("utf-8")
    if len(data) <= target_bytes:
        raise ContextCurveError(f"a sequence of {len(data)} bytes leaves no context before a "
                                f"{target_bytes}-byte target")
    cut = text.find("\n", len(data[:-target_bytes].decode("utf-8", errors="ignore"))) + 1
    if cut <= 0 or cut >= len(text):
        raise ContextCurveError("the target would be empty; use a smaller --context-target")
    return text[:cut], text[cut:]


def score_point(model: Any, context_ids: Sequence[int], target_ids: Sequence[int],
                target_bytes: int, length: int) -> tuple[float, int]:
    """(bits per byte of the target given `length` context tokens, tokens actually given)."""
    max_len = model.config.max_seq_len
    prefix = model.tokenizer.encode("", bos=True)  # [BOS], or nothing for a model without one
    keep = min(length, len(context_ids), max_len - len(prefix) - len(target_ids))
    if keep < 1:
        raise ContextCurveError(f"a target of {len(target_ids)} tokens leaves no room for "
                                f"context in {max_len} positions")
    seq = prefix + list(context_ids[len(context_ids) - keep:]) + list(target_ids)
    ids = np.asarray(seq, np.int32)[None]
    nll = token_nll(model, ids[:, :-1], ids[:, 1:])[0]
    nats = float(np.sum(nll[-len(target_ids):]))
    return nats / (target_bytes * math.log(2)), keep


def run(model: Any, sources: Mapping[str, str], out_dir: str | Path, *, model_id: str,
        lengths: Sequence[int] = DEFAULT_LENGTHS, target_bytes: int = DEFAULT_TARGET_BYTES,
        progress: bool = True) -> dict:
    """The curve for every source: {"sources": {name: {length: bpb}}, "mean": {...}}."""
    if not lengths or any(n < 1 for n in lengths) or target_bytes < 1:
        raise ContextCurveError("lengths and target_bytes must be positive")
    if not sources:
        raise ContextCurveError("no sources to score")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    done: dict[tuple[str, int], dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                if r["model"] == model_id and r["target_bytes_requested"] == target_bytes:
                    done[(r["source"], r["length"])] = r
            except (ValueError, KeyError, TypeError):
                continue  # torn by an interrupted write
    work = [(name, n) for name in sources for n in sorted(lengths)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="context", unit="point", dynamic_ncols=True)
    info: dict[str, dict] = {}
    try:
        with open(path, "a", encoding="utf-8") as f:
            for name, text in sources.items():
                context, target = split_target(text, target_bytes)
                ctx_ids = target_ids = None
                for n in sorted(lengths):
                    if (name, n) not in done:
                        if ctx_ids is None:
                            ctx_ids = model.tokenizer.encode(context)
                            target_ids = model.tokenizer.encode(target)
                        wanted = min(n, model.config.max_seq_len - 1 - len(target_ids))
                        if len(ctx_ids) < wanted:  # the source is too short for this point
                            r = {"bpb": None, "context_tokens": len(ctx_ids)}
                        else:
                            bpb, kept = score_point(model, ctx_ids, target_ids,
                                                    len(target.encode("utf-8")), n)
                            r = {"bpb": bpb, "context_tokens": kept}
                        r.update(model=model_id, source=name, length=n,
                                 target_bytes_requested=target_bytes,
                                 target_bytes=len(target.encode("utf-8")),
                                 target_tokens=len(target_ids))
                        f.write(json.dumps(r) + "\n")
                        f.flush()
                        done[(name, n)] = r
                    if bar is not None:
                        bar.update(1)
                info[name] = {"target_bytes": done[(name, sorted(lengths)[0])]["target_bytes"]}
    finally:
        if bar is not None:
            bar.close()
    curves = {name: {str(n): done[(name, n)]["bpb"] for n in sorted(lengths)} for name in sources}
    tokens = {name: {str(n): done[(name, n)]["context_tokens"] for n in sorted(lengths)}
              for name in sources}
    mean = {}
    for n in sorted(lengths):
        values = [curves[name][str(n)] for name in sources]
        mean[str(n)] = None if None in values else sum(values) / len(values)
    return {"lengths": sorted(lengths), "sources": curves, "context_tokens": tokens,
            "mean": mean, "targets": info, "results_path": str(path)}


def plot(result: dict, path: str | Path) -> Path:
    """Bits per byte against context length (log scale), one line per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in result["sources"].items():
        xs = [int(n) for n, v in curve.items() if v is not None]
        ax.plot(xs, [curve[str(n)] for n in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens before the target")
    ax.set_ylabel("bits per byte of the target")
    ax.set_title("same target, more context: lower is better")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
