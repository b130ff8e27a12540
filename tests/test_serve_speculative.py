"""Speculative decoding in the server (`spark serve --speculative prompt_lookup`): greedy
text served with drafts equals `SparkModel.generate`'s plain decoding token for token, over
HTTP and the WebSocket, alone and batched beside sampled requests (which must get what a
server without speculation gives them); the counts in final frames, usage and /health."""

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import websockets

import spark_model
from spark_model import speculative
from spark_model.serve import app as app_mod, spec_slots
from spark_model.serve.server import ServerThread

CAPACITY = 512
K = 4
# Code that repeats (drafts are accepted) and fresh code (drafts mostly fail).
REPEAT = ("def area(w, h):\n    return w * h\n\n\ndef area(w, h):\n    return w * h\n\n\n"
          "def area(")
PROMPTS = [REPEAT, "def fibonacci(n):", "import os\n",
           "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
           "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n"]


@pytest.fixture(scope="module")
def reference():
    return spark_model.load(capacity=CAPACITY)


@pytest.fixture(scope="module")
def spec_server():
    model = spark_model.load(capacity=CAPACITY)
    with ServerThread(model, max_batch=4, warmup=False, speculative="prompt_lookup",
                      draft_tokens=K) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server():
    model = spark_model.load(capacity=CAPACITY)
    with ServerThread(model, max_batch=4, warmup=False) as srv:
        yield srv


def _want(reference, prompt: str, n: int) -> tuple[str, int]:
    """Plain greedy decoding's text and token count (the end id included, if one ends it)."""
    ids = reference.tokenizer.encode(prompt, bos=True)
    return reference.generate(prompt, n), len(reference.generate_tokens([ids], n)[0])


def _wait_idle(srv, timeout=30.0):
    engine = srv.app.state.engine
    deadline = time.monotonic() + timeout
    while engine.stats()["active"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


async def _ws_run(url: str, requests: dict) -> dict:
    """Send every request on one connection at once; id -> {"text", "final"}."""
    out = {rid: {"text": ""} for rid in requests}
    async with websockets.connect(url) as ws:
        for rid, body in requests.items():
            await ws.send(json.dumps({"type": "request", "id": rid, **body}))
        pending = set(requests)
        while pending:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if frame["type"] == "delta":
                out[frame["id"]]["text"] += frame["text"]
            else:
                out[frame["id"]]["final"] = frame
                pending.discard(frame["id"])
    return out


@pytest.mark.slow
def test_http_greedy_text_is_plain_decoding_and_counts_are_reported(spec_server, reference):
    for prompt in PROMPTS:
        text, count = _want(reference, prompt, 48)
        r = httpx.post(spec_server.url + "/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": 48, "temperature": 0})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == text, prompt
        assert out["usage"]["completion_tokens"] == count
        details = out["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] >= 0 <= details["rejected_prediction_tokens"]
        if prompt == REPEAT:
            assert details["accepted_prediction_tokens"] > 0, details
    # Streamed (server-sent events): the same text.
    text, _ = _want(reference, REPEAT, 40)
    with httpx.stream("POST", spec_server.url + "/v1/completions", timeout=300, json={
            "prompt": REPEAT, "max_tokens": 40, "temperature": 0, "stream": True}) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines()
                 if x.startswith("data: ") and x != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in lines) == text
    assert lines[-1]["spark"]["speculative"]["accepted_tokens"] > 0


@pytest.mark.slow
def test_websocket_batch_of_greedy_and_sampled_requests(spec_server, plain_server, reference):
    """Greedy requests (drafting) share decode calls with sampled ones, one opting out and
    one drafting: every greedy text is plain decoding's, the opted-out seeded text is
    what the server without speculation samples, and each final frame carries its own
    counts."""
    requests = {f"g{i}": {"prompt": p, "max_tokens": 30 + 9 * i, "temperature": 0}
                for i, p in enumerate(PROMPTS)}
    requests |= {"s0": {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.9,
                        "seed": 11, "speculative": False},
                 # a low temperature follows the repetition, so there are drafts to check
                 "s1": {"prompt": REPEAT, "max_tokens": 24, "temperature": 0.2, "seed": 12}}
    got = asyncio.run(_ws_run(spec_server.ws_url, requests))
    plain = asyncio.run(_ws_run(plain_server.ws_url, {"s0": requests["s0"]}))
    for rid, body in requests.items():
        final = got[rid]["final"]
        assert final["type"] == "done", final
        counts = final["speculative"]
        assert 0 <= counts["accepted_tokens"] <= counts["drafted_tokens"]
        if rid.startswith("g"):
            text, count = _want(reference, body["prompt"], body["max_tokens"])
            assert got[rid]["text"] == text, rid
            assert final["usage"]["completion_tokens"] == count, rid
        elif rid == "s0":
            assert got[rid]["text"] == plain[rid]["text"], rid
            assert counts == {"drafted_tokens": 0, "accepted_tokens": 0}
            assert "speculative" not in plain[rid]["final"]  # that server does not draft
        else:  # sampled and drafting: the draws differ from plain sampling's
            assert counts["drafted_tokens"] > 0
            assert 1 <= final["usage"]["completion_tokens"] <= 24
    assert got["g0"]["final"]["speculative"]["accepted_tokens"] > 0  # the repetitive one


def test_request_opt_out_and_health_totals(spec_server, reference):
    text, _ = _want(reference, REPEAT, 40)
    _wait_idle(spec_server)
    before = httpx.get(spec_server.url + "/health").json()["speculative"]
    assert before["enabled"] and before["method"] == "prompt_lookup"
    assert before["draft_tokens"] == K
    got = asyncio.run(_ws_run(spec_server.ws_url, {
        "on": {"prompt": REPEAT, "max_tokens": 40, "temperature": 0},
        "off": {"prompt": REPEAT, "max_tokens": 40, "temperature": 0, "speculative": False},
        "forced": {"prompt": REPEAT, "max_tokens": 40, "temperature": 0,
                   "speculative": True}}))
    assert got["on"]["text"] == got["off"]["text"] == got["forced"]["text"] == text
    assert got["off"]["final"]["speculative"] == {"drafted_tokens": 0, "accepted_tokens": 0}
    on = got["on"]["final"]["speculative"]
    assert on["accepted_tokens"] > 0 and got["forced"]["final"]["speculative"] == on
    _wait_idle(spec_server)
    after = httpx.get(spec_server.url + "/health").json()["speculative"]
    assert after["drafted_tokens"] - before["drafted_tokens"] == 2 * on["drafted_tokens"]
    assert after["accepted_tokens"] - before["accepted_tokens"] == 2 * on["accepted_tokens"]
    assert after["acceptance_rate"] == pytest.approx(
        after["accepted_tokens"] / after["drafted_tokens"], abs=1e-6)


@pytest.mark.parametrize("body, needle", [
    ({"speculative": "yes", "temperature": 0}, "true, false or null"),
    ({"speculative": 1, "temperature": 0}, "true, false or null"),
])
def test_bad_speculative_field_is_a_400(spec_server, body, needle):
    r = httpx.post(spec_server.url + "/v1/completions", timeout=60,
                   json={"prompt": "x", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "speculative" and needle in err["message"]


def test_speculative_true_on_a_plain_server_is_a_400(plain_server):
    r = httpx.post(plain_server.url + "/v1/completions", timeout=60,
                   json={"prompt": "x", "max_tokens": 2, "temperature": 0,
                         "speculative": True})
    assert r.status_code == 400 and "--speculative" in r.json()["error"]["message"]
    health = httpx.get(plain_server.url + "/health").json()
    assert health["speculative"] == {"enabled": False}


@pytest.mark.parametrize("kw, needle", [
    ({"speculative": "draft_mode"}, "choose from prompt_lookup, draft_model"),
    ({"speculative": "draft_model"}, "a draft model go together"),
    ({"speculative": "prompt_lookup", "draft_tokens": 0}, "1..8"),
    ({"speculative": "prompt_lookup", "draft_tokens": 9}, "1..8"),
    ({"speculative": "prompt_lookup", "draft_tokens": 2.5}, "1..8"),
])
def test_bad_server_settings_raise_one_clear_error(reference, kw, needle):
    with pytest.raises(speculative.SpeculationError, match=needle.replace(".", r"\.")):
        app_mod.create_app(reference, max_batch=1, warmup=False, **kw)


def test_cli_choices_match_the_engine():
    from spark_model import commands

    assert commands.SPECULATIVE_METHODS == spec_slots.METHODS
    assert commands.MAX_DRAFT == speculative.MAX_DRAFT


@pytest.mark.parametrize("args, needle", [
    (["--speculative", "ngram"], "invalid choice: 'ngram' (choose from 'prompt_lookup')"),
    (["--speculative", "prompt_lookup", "--draft-tokens", "9"], "must be an integer in 1..8"),
    (["--speculative", "prompt_lookup", "--draft-tokens", "two"], "must be an integer"),
    (["--draft-tokens", "3"], "--draft-tokens needs --speculative prompt_lookup"),
])
def test_serve_cli_rejects_bad_speculation_options(args, needle):
    out = subprocess.run([sys.executable, "-m", "spark_model.cli", "serve", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_drafts_over_prompts_reused_from_the_prefix_cache(reference):
    """A prompt admitted after cached blocks (only its rest prefilled) still drafts from
    its whole prompt, and its text is plain decoding's."""
    model = spark_model.load(capacity=CAPACITY)
    with ServerThread(model, max_batch=2, warmup=False, prefix_cache_mb=4,
                      speculative="prompt_lookup", draft_tokens=K) as srv:
        for prompt in (REPEAT, REPEAT + "w, h):\n    return w * h\n\n\ndef area("):
            text, count = _want(reference, prompt, 32)
            got = asyncio.run(_ws_run(srv.ws_url, {"a": {"prompt": prompt, "max_tokens": 32,
                                                         "temperature": 0}}))["a"]
            assert got["text"] == text and got["final"]["usage"]["completion_tokens"] == count
            assert got["final"]["speculative"]["accepted_tokens"] > 0
        assert got["final"]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
