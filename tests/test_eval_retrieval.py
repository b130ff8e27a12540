"""Code retrieval: needles, contexts, and the scorer against an oracle and random weights."""

from __future__ import annotations

import inspect
import json
import random
import re
import textwrap
import types

import pytest

from eval import retrieval
from spark_model import SparkModel

CODE = inspect.getsource(textwrap) * 4


class CharTokenizer:
    def encode(self, text, bos=False):
        return [ord(c) for c in text]

    def decode(self, ids, errors="strict"):
        return "".join(map(chr, ids))


class Oracle:
    """Reads the context: completes `result = cue` with the definition that starts with it."""

    tokenizer = CharTokenizer()
    config = types.SimpleNamespace(max_seq_len=1 << 20)

    def __init__(self, wrong=False):
        self.wrong = wrong
        self.contexts = []

    def prefill_context(self, text, room):
        self.contexts.append(text)
        return types.SimpleNamespace(text=text, length=len(text) + 1)

    def generate_after(self, ctx, prompts, max_new_tokens, stop):
        out = []
        for p in prompts:
            cue = p.split("result = ")[1]
            m = re.search(rf"^def {re.escape(cue)}(\w+)\(([^)]*)\):", ctx.text, re.M)
            name = m.group(1) + ("x" if self.wrong else "")
            out.append(f"{name}({m.group(2)})")
        return out


def test_needles_are_unique_and_land_at_their_depths():
    needles = retrieval.make_needles(random.Random(0), (0.0, 0.5, 1.0), 4)
    assert len({n.cue for n in needles}) == len(needles) == 12
    lines = [f"x{i} = {i}\n" for i in range(1000)]
    text = retrieval.build_context(lines, needles)
    for n in needles:
        assert text.count(f"def {n.name}(") == 1
        before = text[:text.index(f"def {n.name}(")].count("\n") / text.count("\n")
        assert abs(before - n.depth) < 0.05
        compile(n.source, "<needle>", "exec")  # every needle is valid Python
        assert n.cue + n.answer == f"{n.name}({', '.join(n.params)})"


def test_oracle_scores_every_cell_and_a_wrong_answer_none(tmp_path):
    oracle = Oracle()
    got = retrieval.run(oracle, CODE, tmp_path / "o", model_id="o", lengths=(2048, 8192),
                        depths=(0.0, 0.5, 1.0), trials=5, progress=False)
    assert got["mean_accuracy"] == 1.0
    assert got["accuracy"] == {"2048": {"0": 1.0, "0.5": 1.0, "1": 1.0},
                               "8192": {"0": 1.0, "0.5": 1.0, "1": 1.0}}
    assert len(oracle.contexts) == 5 + 2  # 2K: one needle per depth; 8K: four per depth
    assert all(len(c) <= 8192 for c in oracle.contexts)
    assert max(len(c) for c in oracle.contexts) > 8192 - 400  # the context is filled
    wrong = retrieval.run(Oracle(wrong=True), CODE, tmp_path / "w", model_id="w",
                          lengths=(2048,), depths=(0.5,), trials=3, progress=False)
    assert wrong["mean_accuracy"] == 0.0
    again = Oracle()
    retrieval.run(again, CODE, tmp_path / "o", model_id="o", lengths=(2048, 8192),
                  depths=(0.0, 0.5, 1.0), trials=5, progress=False)
    assert again.contexts == []  # resumed from the results file
    retrieval.plot(got, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_random_weights_retrieve_nothing(tmp_path, small_model, small_tokenizer):
    model = SparkModel(small_model, small_tokenizer, capacity=1024)
    got = retrieval.run(model, CODE, tmp_path, model_id="r", lengths=(512,),
                        depths=(0.0, 1.0), trials=3, progress=False)
    assert got["mean_accuracy"] == 0.0  # chance of an exact random name is nil
    rec = json.loads((tmp_path / retrieval.RESULTS_FILE).read_text().splitlines()[0])
    assert 400 < rec["context_tokens"] <= 512


def test_bad_settings(tmp_path):
    with pytest.raises(retrieval.RetrievalError, match="longer than the model"):
        retrieval.run(Oracle(), CODE, tmp_path, model_id="o", lengths=(1 << 21,),
                      progress=False)
    with pytest.raises(retrieval.RetrievalError, match="depths"):
        retrieval.run(Oracle(), CODE, tmp_path, model_id="o", depths=(1.5,), progress=False)
    with pytest.raises(retrieval.RetrievalError, match="fewer than"):
        retrieval.run(Oracle(), "x = 1\n", tmp_path, model_id="o", lengths=(2048,),
                      progress=False)
