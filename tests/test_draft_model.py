"""Draft-model speculative decoding (`spark_model.draft_model`): greedy output is plain
decoding's token for token, whether the draft model agrees with the model (itself as the
draft) or not (a random model over the same vocabulary); bad draft models are refused."""

from __future__ import annotations

import pytest

import spark_model
from spark_model.api import SparkModel
from spark_model.speculative import SpeculationError

from fim_models import random_model

PROMPTS = ["def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n",
           "import os\n\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n",
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"]


def _with_one_more_piece(tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from spark_model.tokenizer import Tokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.serialized())
    p = proto.pieces.add()
    p.piece, p.score, p.type = "<extra>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return Tokenizer.from_bytes(proto.SerializeToString())


@pytest.fixture(scope="module")
def model():
    return spark_model.load(capacity=256)


def _check(model, draft, k, min_rate):
    plain = model.generate_tokens([model.tokenizer.encode(p, bos=True) for p in PROMPTS], 48,
                                  ignore_eos=True)
    spec = model.generate_tokens([model.tokenizer.encode(p, bos=True) for p in PROMPTS], 48,
                                 ignore_eos=True, speculative=draft, draft_tokens=k)
    assert spec == plain
    st = model.last_stats
    assert st["drafted_tokens"] > 0
    assert st["accepted_tokens"] >= min_rate * st["drafted_tokens"], st
    return st


def test_a_random_draft_model_leaves_greedy_output_unchanged(model):
    draft = SparkModel(random_model(model.config.vocab_size, max_seq_len=256), model.tokenizer)
    st = _check(model, draft, 3, 0.0)
    assert st["accepted_tokens"] < st["drafted_tokens"]  # it did reject drafts


@pytest.mark.slow
def test_the_model_as_its_own_draft_is_mostly_accepted(model):
    """The draft steps are plain one-row steps and the verify rows are computed like them,
    so the model drafting for itself has nearly every draft accepted."""
    st = _check(model, spark_model.load(capacity=256), 4, 0.9)
    assert st["steps"] < st["new_tokens"] / 3


def test_bad_draft_models_are_refused(model):
    other = _with_one_more_piece(model.tokenizer)  # another vocabulary
    wrong_vocab = SparkModel(random_model(other.vocab_size, max_seq_len=256), other)
    with pytest.raises(SpeculationError, match="vocabulary differs"):
        model.generate("x", 4, speculative=wrong_vocab)
    short = SparkModel(random_model(model.config.vocab_size, max_seq_len=128), model.tokenizer)
    with pytest.raises(SpeculationError, match="holds 128 positions, fewer than this model's "
                                               "capacity of 256"):
        model.generate("x", 4, speculative=short)
    with pytest.raises(SpeculationError, match="a draft model"):
        model.generate("x", 4, speculative="draft")
    draft = SparkModel(random_model(model.config.vocab_size, max_seq_len=256), model.tokenizer)
    with pytest.raises(SpeculationError, match="draft_tokens must be an integer in 1..8"):
        model.generate("x", 4, speculative=draft, draft_tokens=9)
