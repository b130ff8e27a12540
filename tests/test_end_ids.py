"""Generation ends at any of several end ids (a tokenizer's `end_ids`), checked against
greedy decoding by the full forward pass (`full_logits`), cut at the first end id."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import spark_model
from spark_model import SparkModel, engine
from spark_model.tokenizer import Tokenizer
from spark_model.transformer import full_logits

PROMPTS = ["def fibonacci(n):\n", "import os\nclass A:\n", "x = [i * i for i in "]
N_NEW = 40


class EndTokenizer(Tokenizer):
    """The SentencePiece tokenizer with end ids chosen by the test (its own: EOS only)."""

    chosen: tuple[int, ...] = ()
    end_ids = property(lambda self: self.chosen)


def with_end_ids(tokenizer: Tokenizer, ids) -> EndTokenizer:
    out = EndTokenizer.from_bytes(tokenizer.serialized())
    out.chosen = tuple(ids)
    return out


@pytest.fixture(scope="module")
def shipped():
    """The shipped trained model: its greedy chains vary (a random model's repeat one id)."""
    return spark_model.load(capacity=256)


@pytest.fixture(scope="module")
def weights(shipped):
    return shipped.model


@pytest.fixture(scope="module")
def tokenizer(shipped):  # the shipped SentencePiece tokenizer (its end ids: EOS)
    return shipped.tokenizer


@pytest.fixture(scope="module")
def chains(weights, tokenizer):
    """Each prompt's N_NEW greedy ids by re-running the full forward every step, never
    stopping (the cut is applied by `_cut`)."""
    ids = [tokenizer.encode(p, bos=True) for p in PROMPTS]
    width = 128
    out: list[list[int]] = [[] for _ in PROMPTS]
    for _ in range(N_NEW):
        seqs = [x + o for x, o in zip(ids, out)]
        batch = np.full((len(seqs), width), tokenizer.pad_id, np.int32)
        for row, s in zip(batch, seqs):
            row[:len(s)] = s
        logits = np.asarray(full_logits(weights, jnp.asarray(batch)))
        for o, s, lg in zip(out, seqs, logits):
            o.append(int(np.argmax(lg[len(s) - 1])))
    return out


def _cut(chain: list[int], end_ids) -> list[int]:
    """The chain up to and including its first end id."""
    hits = [i for i, t in enumerate(chain) if t in end_ids]
    return chain[:hits[0] + 1] if hits else chain


def _first_seen(chain: list[int]) -> dict[int, int]:
    first: dict[int, int] = {}
    for i, t in enumerate(chain):
        first.setdefault(t, i)
    return first


def test_generation_stops_at_any_of_several_end_ids(weights, tokenizer, chains):
    # Two ids that first appear at different depths of the first chain, listed latest
    # first: the second entry of the vector must end the first row, not only the first.
    seen = sorted((i, t) for t, i in _first_seen(chains[0]).items() if i >= 1)
    assert len(seen) >= 4, "the reference chain repeats too soon to pick end ids from"
    early, late = seen[0][1], seen[len(seen) // 2][1]
    late1 = max((i, t) for t, i in _first_seen(chains[1]).items())[1]  # row 1's last new id
    end_ids = (late, early, late1, tokenizer.eos_id)  # all MAX_END_IDS entries used
    assert len(end_ids) == engine.MAX_END_IDS and len(set(end_ids)) == 4
    lm = SparkModel(weights, with_end_ids(tokenizer, end_ids), capacity=256)
    assert lm.end_ids == end_ids

    want = [_cut(c, end_ids) for c in chains]
    assert len(want[0]) < N_NEW and want[0][-1] == early  # the test really cuts
    assert sum(len(w) < N_NEW for w in want) >= 2
    prompt_ids = [tokenizer.encode(p, bos=True) for p in PROMPTS]
    assert lm.generate_tokens(prompt_ids, N_NEW) == want  # one batch, rows end apart

    # Text: the ids without the end id that ended them; batched, single and streamed.
    text = [tokenizer.decode(w[:-1] if w[-1] in end_ids else w, errors="replace")
            for w in want]
    assert lm.generate(PROMPTS, N_NEW) == text
    assert lm.generate(PROMPTS[0], N_NEW) == text[0]
    assert "".join(lm.stream(PROMPTS[0], N_NEW)) == text[0]

    # ignore_eos: every end id is off, the whole chain comes back.
    assert lm.generate_tokens(prompt_ids, N_NEW, ignore_eos=True) == chains


def test_one_end_id_is_the_tokenizers_eos(weights, tokenizer):
    lm = SparkModel(weights, tokenizer, capacity=256)
    assert lm.end_ids == (tokenizer.eos_id,)
    vec = lm.end_id_vector()
    assert vec.shape == (engine.MAX_END_IDS,) and vec.tolist() == [
        tokenizer.eos_id] + [-1] * (engine.MAX_END_IDS - 1)
    assert lm.end_id_vector(ignore_eos=True).tolist() == [-1] * engine.MAX_END_IDS


@pytest.mark.parametrize("ids,match", [
    (tuple(range(4, 4 + engine.MAX_END_IDS + 1)), "at most 4"),
    ((5, -1), "not a token id"),
    ((5, 100_000), "not a token id"),
])
def test_bad_end_ids_are_refused_when_the_model_is_built(weights, tokenizer, ids, match):
    with pytest.raises(ValueError, match=match):
        SparkModel(weights, with_end_ids(tokenizer, ids), capacity=256)
