"""Draft-model speculation in the server (`spark serve --draft-model MODEL`,
`spark_model.serve.draft_slots`): greedy text served with a draft model's drafts equals
`SparkModel.generate`'s plain decoding token for token, batched and with the prefix cache
reusing prompts, whether the draft agrees with the model (the model itself) or not (a
random model); the counts; bad settings refused."""

import asyncio
import subprocess
import sys

import httpx
import pytest

import spark_model
from spark_model.api import SparkModel
from spark_model.serve import app as app_mod
from spark_model.serve.server import ServerThread
from spark_model.speculative import SpeculationError

from fim_models import random_model
from test_serve_speculative import PROMPTS, REPEAT, _want, _wait_idle, _ws_run

CAPACITY = 512
K = 4


@pytest.fixture(scope="module")
def reference():
    return spark_model.load(capacity=CAPACITY)


@pytest.mark.slow
def test_self_draft_batch_is_plain_decoding_and_mostly_accepted(reference):
    """The model drafting for itself (its drafts are its own one-row steps): every greedy
    text of a batch is plain decoding's, nearly every draft is accepted, a sampled request
    that opts out drafts nothing, and a prompt resent after the prefix cache kept it (the
    model prefills only its rest, the draft model all of it) still gets the same text."""
    with ServerThread(spark_model.load(capacity=CAPACITY), max_batch=4, warmup=False,
                      speculative=spark_model.load(capacity=CAPACITY), draft_tokens=K,
                      prefix_cache_mb=16) as srv:
        requests = {f"g{i}": {"prompt": p, "max_tokens": 24 + 8 * i, "temperature": 0}
                    for i, p in enumerate(PROMPTS)}
        requests["s"] = {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0.8,
                         "seed": 3, "speculative": False}
        got = asyncio.run(_ws_run(srv.ws_url, requests))
        for rid, body in requests.items():
            final = got[rid]["final"]
            assert final["type"] == "done", final
            counts = final["speculative"]
            if rid == "s":
                assert counts == {"drafted_tokens": 0, "accepted_tokens": 0}
                continue
            text, count = _want(reference, body["prompt"], body["max_tokens"])
            assert got[rid]["text"] == text, rid
            assert final["usage"]["completion_tokens"] == count, rid
            assert counts["accepted_tokens"] >= 0.8 * counts["drafted_tokens"] > 0, counts
        again = asyncio.run(_ws_run(srv.ws_url, {"r": requests["g3"]}))["r"]
        assert again["text"] == got["g3"]["text"]
        _wait_idle(srv)
        health = httpx.get(srv.url + "/health").json()
        assert health["speculative"]["method"] == "draft_model"
        assert health["speculative"]["draft_tokens"] == K
        assert health["prefix_cache"]["hits"] >= 1, health["prefix_cache"]


def test_a_random_draft_model_leaves_greedy_text_unchanged(reference):
    draft = SparkModel(random_model(reference.config.vocab_size, max_seq_len=CAPACITY),
                       reference.tokenizer)
    with ServerThread(spark_model.load(capacity=CAPACITY), max_batch=2, warmup=False,
                      speculative=draft, draft_tokens=3) as srv:
        drafted = accepted = 0
        for prompt in (REPEAT, PROMPTS[3]):
            text, count = _want(reference, prompt, 32)
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": prompt, "max_tokens": 32, "temperature": 0})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["text"] == text
            assert out["usage"]["completion_tokens"] == count
            details = out["usage"]["completion_tokens_details"]
            accepted += details["accepted_prediction_tokens"]
            drafted += (details["accepted_prediction_tokens"]
                        + details["rejected_prediction_tokens"])
        assert 0 <= accepted < drafted  # it did reject drafts


def test_bad_draft_settings_are_refused(reference):
    from test_draft_model import _with_one_more_piece

    other = _with_one_more_piece(reference.tokenizer)
    wrong_vocab = SparkModel(random_model(other.vocab_size, max_seq_len=CAPACITY), other)
    with pytest.raises(SpeculationError, match="vocabulary differs"):
        app_mod.create_app(reference, max_batch=1, warmup=False, speculative=wrong_vocab)
    short = SparkModel(random_model(reference.config.vocab_size, max_seq_len=128),
                       reference.tokenizer)
    with pytest.raises(SpeculationError, match="holds 128 positions"):
        app_mod.create_app(reference, max_batch=1, warmup=False, speculative=short)
    draft = SparkModel(random_model(reference.config.vocab_size, max_seq_len=CAPACITY),
                       reference.tokenizer)
    with pytest.raises(SpeculationError, match="1..8"):
        app_mod.create_app(reference, max_batch=1, warmup=False, speculative=draft,
                           draft_tokens=9)
    with pytest.raises(SpeculationError, match="go together"):
        app_mod.create_app(reference, max_batch=1, warmup=False, speculative="draft_model")


@pytest.mark.parametrize("args, needle", [
    (["--draft-model", "x", "--speculative", "prompt_lookup"], "leave out --speculative"),
    (["--draft-tokens", "3"], "--draft-tokens needs"),
])
def test_cli_refuses_conflicting_flags(args, needle):
    r = subprocess.run([sys.executable, "-m", "spark_model.cli", "serve", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
