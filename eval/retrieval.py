"""Code retrieval over a long context: call a function defined far back.

A needle is a function with a random, unique name and parameter list, e.g.

    def tovu_kelar_mipa(sorin_count, dalo_mode):
        return sorin_count * 3 + len(str(dalo_mode))

placed at a chosen depth (0% = the start, 100% = just before the query) of a context of
real code. The query at the end begins a call, `result = tovu_`, and the trial succeeds
when greedy decoding completes the exact rest of the name and the argument list,
`kelar_mipa(sorin_count, dalo_mode)`. Names are made of random syllables, so no training
file contains them and only the context can supply them.

One long prefill serves many trials: a context holds several needles (per depth, spread
over a band of 2% of the context around it), each with a distinct first word, and every
query is decoded from its own copy of the filled cache (`SparkModel.prefill_context` and
`generate_after`). The grid is context lengths x depths with `trials` needles per cell;
results are appended to `retrieval_results.jsonl` per context and reused on a rerun.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Sequence

RESULTS_FILE = "retrieval_results.jsonl"
DEFAULT_LENGTHS = (2048, 8192, 32768, 131072)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BAND = 0.02  # needles of one depth are spread over this share of the context
ROOM = 64  # positions after the context for a query and its answer
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


class RetrievalError(ValueError):
    """Settings or a model the retrieval task cannot use."""


@dataclasses.dataclass(frozen=True)
class Needle:
    name: str
    params: tuple[str, ...]
    depth: float  # the grid cell's depth
    at: float  # where it was placed, as a share of the context's lines

    @property
    def source(self) -> str:
        a = self.params[0]
        rest = " + ".join(f"len(str({p}))" for p in self.params[1:]) or "0"
        return f"def {self.name}({', '.join(self.params)}):\n    return {a} * 3 + {rest}\n"

    @property
    def cue(self) -> str:
        """The start of the call the query gives: its first word and underscore."""
        return self.name.split("_")[0] + "_"

    @property
    def answer(self) -> str:
        return self.name[len(self.cue):] + "(" + ", ".join(self.params) + ")"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def make_needles(rng: random.Random, depths: Sequence[float], per_depth: int) -> list[Needle]:
    """per_depth needles for each depth, first words all distinct."""
    needles, firsts = [], set()
    for depth in depths:
        for i in range(per_depth):
            first = _word(rng, 2)
            while first in firsts:
                first = _word(rng, 2)
            firsts.add(first)
            name = "_".join([first, _word(rng, 2), _word(rng, 2)])
            params = tuple(f"{_word(rng, 2)}_{rng.choice(['count', 'mode', 'path', 'size'])}"
                           for _ in range(rng.randint(1, 3)))
            at = depth * (1 - BAND) + BAND * (i + 0.5) / per_depth
            needles.append(Needle(name, params, depth, at))
    return needles


def build_context(haystack_lines: Sequence[str], needles: Sequence[Needle]) -> str:
    """The haystack with each needle inserted before the line at its share of the lines."""
    cuts = sorted(needles, key=lambda n: n.at)
    out, k = [], 0
    for i, line in enumerate(haystack_lines):
        while k < len(cuts) and cuts[k].at * len(haystack_lines) <= i:
            out.append("\n" + cuts[k].source + "\n")
            k += 1
        out.append(line)
    out += ["\n" + n.source + "\n" for n in cuts[k:]]
    return "".join(out)


def haystack(model: Any, text: str, tokens: int) -> list[str]:
    """About `tokens` tokens of `text` from its start, as whole lines (with newlines)."""
    ids = model.tokenizer.encode(text)
    if len(ids) < tokens:
        raise RetrievalError(f"the haystack code has {len(ids)} tokens, fewer than the "
                             f"{tokens} a context needs")
    cut = model.tokenizer.decode(ids[:tokens], errors="replace")
    return cut[:cut.rfind("\n") + 1].splitlines(keepends=True)


def _query(needle: Needle) -> str:
    return "\n\nresult = " + needle.cue


def run(model: Any, code: str, out_dir: str | Path, *, model_id: str,
        lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
        trials: int = 20, seed: int = 0, batch_size: int = 4, progress: bool = True) -> dict:
    """Accuracy per (context length, depth) over `trials` needles each; see the module doc.

    `code` is the haystack source (real code, long enough for the longest context).
    """
    if trials < 1 or batch_size < 1 or not lengths or not depths:
        raise RetrievalError("trials and batch_size must be >= 1, lengths and depths non-empty")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise RetrievalError(f"depths must lie in [0, 1], got {list(depths)}")
    max_len = model.config.max_seq_len
    if max(lengths) > max_len:
        raise RetrievalError(f"a context of {max(lengths)} tokens is longer than the model's "
                             f"{max_len} positions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    done: dict[tuple[int, int], list[dict]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                if r["model"] == model_id and r["seed"] == seed and r["trials"] == trials \
                        and r["depths"] == list(depths):
                    done[(r["length"], r["context"])] = r["outcomes"]
            except (ValueError, KeyError, TypeError):
                continue  # torn by an interrupted write
    plan = []  # (length, context index, per_depth)
    for length in lengths:
        per_depth = min(trials, max(1, length // 2048))
        plan += [(length, c, min(per_depth, trials - c * per_depth))
                 for c in range(-(-trials // per_depth))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="retrieval", unit="context", dynamic_ncols=True)
    try:
        with open(path, "a", encoding="utf-8") as f:
            for length, c, per_depth in plan:
                if (length, c) not in done:
                    rng = random.Random(f"{seed}:{length}:{c}")
                    needles = make_needles(rng, depths, per_depth)
                    spent = sum(len(model.tokenizer.encode(n.source)) + 2 for n in needles)
                    # 32 tokens spare: merges across the joins may add a few
                    lines = haystack(model, code, max(16, length - ROOM - spent - 32))
                    ctx = model.prefill_context(build_context(lines, needles), room=ROOM)
                    n_ctx = ctx.length
                    outcomes = []
                    for i in range(0, len(needles), batch_size):
                        batch = needles[i:i + batch_size]
                        texts = model.generate_after(ctx, [_query(n) for n in batch],
                                                     max_new_tokens=32, stop=["\n"])
                        outcomes += [{"depth": n.depth, "name": n.name, "completion": t,
                                      "ok": t.startswith(n.answer)}
                                     for n, t in zip(batch, texts)]
                    del ctx
                    record = {"model": model_id, "seed": seed, "trials": trials,
                              "depths": list(depths), "length": length, "context": c,
                              "context_tokens": n_ctx, "outcomes": outcomes}
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    done[(length, c)] = outcomes
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    table: dict[str, dict[str, float]] = {}
    for length in lengths:
        rows = [o for (n, _), outs in done.items() if n == length for o in outs]
        table[str(length)] = {f"{d:g}": sum(o["ok"] for o in rows if o["depth"] == d)
                              / max(1, sum(1 for o in rows if o["depth"] == d)) for d in depths}
    overall = [o["ok"] for (n, _), outs in done.items() if n in lengths for o in outs]
    return {"accuracy": table, "mean_accuracy": sum(overall) / len(overall),
            "trials_per_cell": trials, "lengths": list(lengths), "depths": list(depths),
            "contexts": len(plan), "results_path": str(path)}


def plot(result: dict, path: str | Path) -> Path:
    """The accuracy grid as a heat map: context length (rows) x depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    grid = np.array([[result["accuracy"][str(n)][f"{d:g}"] for d in depths] for n in lengths])
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.7 * len(lengths) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n)
                                        for n in lengths])
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("depth of the definition in the context")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"call completion accuracy ({result['trials_per_cell']} trials per cell)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
