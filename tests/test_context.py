"""A context prefilled once and continued many times equals generating from the whole text."""

from __future__ import annotations

import pytest

from spark_model import SparkModel

CONTEXT = "import os\n\ndef main(argv):\n    for name in argv:\n        print(os.path.join(name, 'x'))\n" * 3
PROMPTS = ["\ndef helper(", "\nclass Thing", "\n    return "]


@pytest.fixture(scope="module")
def model(small_model, small_tokenizer):
    return SparkModel(small_model, small_tokenizer, capacity=512)


def test_continuing_a_context_equals_generating_from_its_tokens(model):
    ctx = model.prefill_context(CONTEXT, room=48)
    ids = model.tokenizer.encode(CONTEXT, bos=True)
    assert ctx.length == len(ids)
    full = model.generate_tokens([ids + model.tokenizer.encode(p) for p in PROMPTS], 24)
    want = [model.tokenizer.decode(x, errors="replace") for x in full]
    assert model.generate_after(ctx, PROMPTS, max_new_tokens=24) == want
    # The context is left as it was: a second batch, and a single prompt, agree too.
    assert model.generate_after(ctx, PROMPTS[::-1], max_new_tokens=24) == want[::-1]
    assert model.generate_after(ctx, PROMPTS[1], max_new_tokens=24) == want[1]


def test_bad_continuations_are_clear_errors(model):
    ctx = model.prefill_context(CONTEXT, room=20)
    with pytest.raises(ValueError, match="exceeds the KV-cache capacity of 20"):
        model.generate_after(ctx, "x = ", max_new_tokens=30)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate_after(ctx, ["x", ""], max_new_tokens=2)
    with pytest.raises(TypeError, match="prefill_context"):
        model.generate_after("not a context", "x", max_new_tokens=2)
    with pytest.raises(ValueError, match="room"):
        model.prefill_context(CONTEXT, room=1)
    with pytest.raises(ValueError, match="positions"):
        model.prefill_context(CONTEXT, room=model.config.max_seq_len)
