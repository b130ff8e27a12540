"""Line completion: edit similarity against a plain reference, sampling, and the scorer."""

from __future__ import annotations

import re

import pytest

from eval import line_completion as lc
from spark_model import SparkModel


def _levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme, the reference for rapidfuzz's distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@pytest.mark.parametrize("a,b", [
    ("", ""), ("", "x = 1"), ("x = 1", "x = 1"), ("x = 1", "x = 2"),
    ("    return total", "    return total_sum"), ("kitten", "sitting"),
    ("for i in range(n):", "for j in range(m):"), ("naïve = 'ü'", "naive = 'u'"),
    ("abc", "xyz"), ("print(a, b)", "print(b, a)"),
])
def test_edit_similarity_matches_the_reference(a, b):
    expected = 1.0 if not (a or b) else 1 - _levenshtein(a, b) / max(len(a), len(b))
    assert lc.edit_similarity(a, b) == pytest.approx(expected, abs=1e-12)


def _files(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import os\n\ndef f(x):\n    return x + 1\n\nprint(f(2))\n", encoding="utf-8")
    b = tmp_path / "b.py"
    b.write_text("x = [1, 2, 3]\ny = sum(x)\n", encoding="utf-8")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe not utf-8\n")
    return [a, b, tmp_path / "bad.py"]


def test_sampling_is_seeded_and_cuts_at_line_starts(tmp_path):
    files = _files(tmp_path)
    s1 = lc.sample_lines("t", files, 20, seed=3)
    assert s1 == lc.sample_lines("t", files[::-1], 20, seed=3)
    assert s1 != lc.sample_lines("t", files, 20, seed=4)
    for s in s1:
        text = open(s.file, encoding="utf-8").read()
        assert text.startswith(s.before + s.line)
        assert s.line.strip() and s.line_no >= 1 and s.before.endswith("\n")
    with pytest.raises(lc.LineTaskError, match="no readable file"):
        lc.sample_lines("t", [files[2]], 5)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class MergingTokenizer:
    """One token for a newline and the spaces after it (as SmolLM2's vocabulary has)."""

    def __init__(self):
        self.pieces: list[str] = []

    def encode(self, text):
        out = []
        for piece in re.findall(r"\n +|.|\n", text, flags=re.S):
            if piece not in self.pieces:
                self.pieces.append(piece)
            out.append(self.pieces.index(piece))
        return out

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


class Oracle:
    """Answers each prompt with the real next line (or a fixed wrong one). With a merging
    tokenizer the prompt must end at the previous line's text, and the oracle writes the
    newlines that were cut off first; otherwise it must end with the newline."""

    capacity = 4096

    def __init__(self, samples, wrong=None, merging=False):
        self.tokenizer = MergingTokenizer() if merging else CharTokenizer()
        self.answers = {}
        for s in samples:
            cut = s.before.rstrip("\n") if merging else s.before
            self.answers[cut] = s.before[len(cut):] + s.line
        self.wrong = wrong
        self.merging = merging
        self.prompts = []

    def generate(self, prompts, **kw):
        self.prompts += prompts
        out = []
        for p in prompts:
            assert p.endswith("\n") != self.merging
            line = next(v for k, v in self.answers.items() if k.endswith(p))
            lead = "\n" if self.merging else ""
            out.append((lead + self.wrong if self.wrong is not None else line) + "\nnext")
        return out


@pytest.mark.parametrize("merging", [False, True])
def test_scorer_gives_the_oracle_full_marks_and_truncates_context(tmp_path, merging):
    samples = lc.sample_lines("t", _files(tmp_path), 12, seed=0)
    assert lc.merges_newline_indent(Oracle(samples, merging=merging).tokenizer) == merging
    got = lc.run(Oracle(samples, merging=merging), samples, tmp_path / "o", model_id="o", context=500,
                 progress=False)
    assert got["sources"]["t"]["exact_match"] == 1.0
    assert got["sources"]["t"]["edit_similarity"] == 1.0
    wrong = Oracle(samples, wrong="\x00", merging=merging)  # no character in any line
    got = lc.run(wrong, samples, tmp_path / "w", model_id="w", context=5, progress=False)
    assert got["sources"]["t"]["exact_match"] == 0.0
    assert got["sources"]["t"]["edit_similarity"] == 0.0
    assert all(len(p) <= 5 for p in wrong.prompts)
    again = lc.run(wrong, samples, tmp_path / "w", model_id="w", context=5, progress=False)
    assert again["reused"] == len(samples) and again["evaluated"] == 0
    with pytest.raises(lc.LineTaskError, match="capacity"):
        lc.run(wrong, samples, tmp_path / "w", model_id="w", context=4090, progress=False)


@pytest.mark.parametrize("text,line", [
    ("\n    return x\nmore", "    return x"), ("\n\n\ndef f():  \n", "def f():"),
    ("    x = 1", "    x = 1"), ("", ""), ("\n", "")])
def test_completed_line_skips_the_cut_newlines(text, line):
    assert lc.completed_line(text) == line


def test_runs_through_the_real_model(tmp_path, small_model, small_tokenizer):
    model = SparkModel(small_model, small_tokenizer, capacity=128)
    samples = lc.sample_lines("t", _files(tmp_path), 3, seed=1)
    got = lc.run(model, samples, tmp_path, model_id="m", context=32, max_new_tokens=8,
                 progress=False)
    summary = got["sources"]["t"]
    assert summary["samples"] == 3 and 0.0 <= summary["edit_similarity"] <= 1.0
    assert 0 < summary["mean_context_tokens"] <= 32
