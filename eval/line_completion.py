"""Line completion: the model's next line against the real one, on held-out code.

Each sample cuts a source file at the start of a non-blank line; the model gets up to
`context` tokens of the file before the cut and completes greedily; its line is what it
writes up to the next newline. For a vocabulary that merges a newline with the next line's
indentation (SmolLM2's: "\n   " then " return"), a prompt ending in a bare newline splits a
token the model always saw whole, and it then writes no indentation at all; for such a
tokenizer (tested once, on text, not per sample: the real line is never looked at) the
prompt ends at the previous line's text and the model writes the newlines itself. The completion is compared with the real line (trailing whitespace ignored,
indentation kept, since it is part of Python's syntax): exact match, and edit similarity,
1 - Levenshtein distance / length of the longer line (rapidfuzz computes the distance).

Samples are drawn with a seeded generator: a file uniformly from the source's files, then
a line uniformly from that file's non-blank lines after the first, so the same seed and
files give the same cuts. Two sources by default: the held-out standard-library files of
the training split, and pytest's source, which no training source contains.
Results go to `line_results.jsonl` as each batch finishes; a rerun with the same model,
context and samples reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Sequence

from rapidfuzz.distance import Levenshtein

from eval.sources import default_code

RESULTS_FILE = "line_results.jsonl"
PROMPT_VERSION = 2  # 2: the prompt ends before the cut's newlines (stored results of 1 rerun)


class LineTaskError(ValueError):
    """Sources or settings the line-completion task cannot use."""


@dataclasses.dataclass(frozen=True)
class LineSample:
    source: str  # the source's name, e.g. "stdlib-heldout"
    index: int  # position among that source's samples
    file: str
    line_no: int  # 0-based line of the file that is cut off
    before: str  # the file's text before the line
    line: str  # the real line, without its newline


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    return Levenshtein.normalized_similarity(a, b)


def sample_lines(source: str, files: Sequence[str | Path], n: int, seed: int = 0
                 ) -> list[LineSample]:
    """n cut points over `files` (sorted first, so the order they come in does not matter)."""
    texts = []
    for path in sorted(map(str, files)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable files are not samples
        lines = text.split("\n")
        eligible = [i for i in range(1, len(lines)) if lines[i].strip()]
        if eligible:
            texts.append((path, lines, eligible))
    if not texts:
        raise LineTaskError(f"{source}: no readable file with a non-blank line to complete")
    rng = random.Random(f"{seed}:{source}")
    samples = []
    for k in range(n):
        path, lines, eligible = texts[rng.randrange(len(texts))]
        i = eligible[rng.randrange(len(eligible))]
        samples.append(LineSample(source, k, path, i, "".join(x + "\n" for x in lines[:i]),
                                  lines[i].rstrip()))
    return samples


def default_sources() -> dict[str, list[Path]]:
    """The default code (`eval.sources`): held-out stdlib files, and pytest's source."""
    return {name: files for name, (files, _) in default_code().items()}


def _prompt(model: Any, before: str, context: int) -> tuple[str, int]:
    """The last `context` tokens of `before` as text, and how many tokens that is."""
    kept = model.tokenizer.encode(before)[-context:]
    while kept:  # a cut inside a multi-byte character: drop the partial character
        try:
            return model.tokenizer.decode(kept), len(kept)
        except UnicodeDecodeError:
            kept = kept[1:]
    return "", 0


def merges_newline_indent(tokenizer: Any) -> bool:
    """Whether the vocabulary writes a newline and the next line's indentation as one token."""
    ids = tokenizer.encode("x = 1\n    y = 2\n")
    return any(len(p) > 1 and p.startswith("\n") and not p.strip()
               for p in (tokenizer.decode([i]) for i in ids))


def completed_line(text: str) -> str:
    """The line a completion writes after the prompt's last line: past the newlines that
    end that line (and any blank lines), up to the next newline, trailing space dropped."""
    return text.lstrip("\n").split("\n", 1)[0].rstrip()


def _stored(path: Path, key: dict) -> dict[tuple[str, int], dict]:
    done: dict[tuple[str, int], dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                if all(r.get(k) == v for k, v in key.items()):
                    done[(r["source"], r["index"])] = r
            except (ValueError, KeyError, TypeError):
                continue  # torn by an interrupted write
    return done


def run(model: Any, samples: Sequence[LineSample], out_dir: str | Path, *, model_id: str,
        context: int = 2048, max_new_tokens: int = 64, batch_size: int = 16,
        progress: bool = True) -> dict:
    """Complete every sample's line; exact match and edit similarity per source."""
    if context < 1 or max_new_tokens < 1 or batch_size < 1:
        raise LineTaskError("context, max_new_tokens and batch_size must be >= 1")
    capacity = getattr(model, "capacity", None)
    if capacity is not None and context + 1 + max_new_tokens > capacity:
        raise LineTaskError(f"--line-context {context} plus BOS and {max_new_tokens} new tokens "
                            f"exceeds the model's KV-cache capacity of {capacity}; "
                            "raise --capacity or lower --line-context")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    key = {"model": model_id, "context": context, "max_new_tokens": max_new_tokens,
           "prompt": PROMPT_VERSION}
    done = _stored(path, key)
    for s in samples:  # a stored result counts only for the very same cut
        r = done.get((s.source, s.index))
        if r is not None and (r.get("file"), r.get("line_no")) != (s.file, s.line_no):
            del done[(s.source, s.index)]
    todo = [s for s in samples if (s.source, s.index) not in done]
    heal = merges_newline_indent(model.tokenizer)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="line", unit="line", dynamic_ncols=True)
    try:
        with open(path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [_prompt(model, s.before.rstrip("\n") if heal else s.before,
                                   context) for s in batch]
                texts = model.generate([p for p, _ in prompts], max_new_tokens=max_new_tokens,
                                       temperature=0.0, **({} if heal else {"stop": ["\n"]}))
                for s, (_, n_ctx), text in zip(batch, prompts, texts):
                    pred = completed_line(text) if heal else text.split("\n", 1)[0].rstrip()
                    r = {**key, "source": s.source, "index": s.index, "file": s.file,
                         "line_no": s.line_no, "context_tokens": n_ctx, "line": s.line,
                         "completion": pred, "exact": pred == s.line,
                         "edit_similarity": edit_similarity(pred, s.line)}
                    f.write(json.dumps(r) + "\n")
                    done[(s.source, s.index)] = r
                f.flush()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    by_source: dict[str, list[dict]] = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(done[(s.source, s.index)])
    summary = {name: {"samples": len(rs),
                      "exact_match": sum(r["exact"] for r in rs) / len(rs),
                      "edit_similarity": sum(r["edit_similarity"] for r in rs) / len(rs),
                      "mean_context_tokens": sum(r["context_tokens"] for r in rs) / len(rs)}
               for name, rs in by_source.items()}
    return {"context": context, "sources": summary, "evaluated": len(todo),
            "reused": len(samples) - len(todo), "results_path": str(path)}
