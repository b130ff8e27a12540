"""HumanEval in chat form: code extraction, and the program it builds against the problem's
own tests (run in the sandbox with the canonical solution as the reply)."""

from __future__ import annotations

import pytest

from eval.chat_mode import completion_from, entry_point, extract_code
from eval.humaneval import build_program, check_completion, load_problems


def test_extract_code_takes_the_first_fenced_block():
    reply = "Sure!\n```python\ndef f():\n    return 1\n```\nand\n```\nx = 2\n```"
    assert extract_code(reply) == "def f():\n    return 1\n"
    assert extract_code("```py\nunclosed = 1\n") == "unclosed = 1\n"
    assert extract_code("no fence at all") == "no fence at all"


def test_entry_point_is_the_last_top_level_def():
    prompt = "def helper(x):\n    return x\n\n\ndef target(a, b):\n    \"\"\"Doc.\"\"\"\n"
    assert entry_point(prompt) == "target"
    assert entry_point("x = 1\n") is None


@pytest.fixture(scope="module")
def problem():
    return load_problems()["HumanEval/0"]


def test_a_reply_with_the_whole_function_passes(problem):
    whole = problem["prompt"] + problem["canonical_solution"]
    reply = f"Here it is:\n```python\n{whole}```\nDone."
    completion = completion_from(problem["prompt"], reply)
    assert completion.lstrip().startswith("from typing import List")
    assert check_completion(problem, completion).passed


def test_a_reply_with_only_the_body_passes(problem):
    reply = f"```python\n{problem['canonical_solution']}```"
    assert check_completion(problem, completion_from(problem["prompt"], reply)).passed


def test_a_wrong_reply_fails(problem):
    reply = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    program = build_program(problem, completion_from(problem["prompt"], reply))
    assert "return True" in program
    assert not check_completion(problem, completion_from(problem["prompt"], reply)).passed
