"""Fill-in-the-middle through the server: `suffix` in /v1/completions and on the WebSocket,
and llama.cpp's /infill. Served text is checked against an independently built SparkModel
over the same weights, and /infill's prompt (with other files as context) against token
generation from an id sequence built by hand from the vocabulary."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import websockets

from spark_model.api import SparkModel
from spark_model.serve.server import ServerThread

from fim_models import random_model, with_fim_pieces

CAPACITY = 256
PREFIX = "def area(r):\n    "
SUFFIX = "\n    return a\n"


@pytest.fixture(scope="module")
def fim_tok(small_tokenizer):
    return with_fim_pieces(small_tokenizer)


@pytest.fixture(scope="module")
def weights(fim_tok):
    return random_model(fim_tok[0].vocab_size, seed=3)


@pytest.fixture(scope="module")
def reference(fim_tok, weights):
    return SparkModel(weights, fim_tok[0], capacity=CAPACITY)


@pytest.fixture(scope="module")
def server(small_tokenizer, weights):
    tok, _ = with_fim_pieces(small_tokenizer)  # its own tokenizer and model object
    with ServerThread(SparkModel(weights, tok, capacity=CAPACITY), max_batch=2,
                      warmup=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(small_tokenizer, small_model):
    with ServerThread(SparkModel(small_model, small_tokenizer, capacity=CAPACITY),
                      max_batch=1, warmup=False) as srv:
        yield srv


def test_completions_with_a_suffix_infill_like_generate(server, reference, fim_tok):
    tok, base = fim_tok
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    want = reference.generate(PREFIX, 24, suffix=SUFFIX)
    out = client.completions.create(model="spark", prompt=PREFIX, suffix=SUFFIX,
                                    max_tokens=24, temperature=0)
    assert out.choices[0].text == want
    hand = [tok.bos_id, base] + tok.encode(PREFIX) + [base + 1] + tok.encode(SUFFIX) + [base + 2]
    assert out.usage.prompt_tokens == len(hand)
    chunks = list(client.completions.create(model="spark", prompt=PREFIX, suffix=SUFFIX,
                                            max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    # Without the suffix it is an ordinary completion.
    plain = client.completions.create(model="spark", prompt=PREFIX, max_tokens=24,
                                      temperature=0)
    assert plain.choices[0].text == reference.generate(PREFIX, 24)


def test_websocket_requests_take_a_suffix(server, reference):
    async def run():
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "request", "id": 1, "prompt": PREFIX,
                                      "suffix": SUFFIX, "max_tokens": 20, "temperature": 0}))
            text = ""
            while (frame := json.loads(await ws.recv()))["type"] == "delta":
                text += frame["text"]
            assert frame["type"] == "done", frame
            return text

    assert asyncio.run(run()) == reference.generate(PREFIX, 20, suffix=SUFFIX)


def test_infill_answers_like_llama_cpp(server, reference, fim_tok):
    tok, base = fim_tok
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16,
            "temperature": 0, "cache_prompt": True, "samplers": ["top_k", "infill"],
            "t_max_predict_ms": 500}
    r = httpx.post(server.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == reference.generate(PREFIX, 16, suffix=SUFFIX)
    assert out["stop"] is True and out["stop_type"] in ("eos", "limit")
    assert out["tokens_evaluated"] == len(reference.fim_prompt_ids(PREFIX, SUFFIX))
    assert out["stop_type"] == ("limit" if out["tokens_predicted"] == 16 else "eos")
    assert set(out["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms"}

    # Streamed: the same text in events, then the whole answer.
    with httpx.stream("POST", server.url + "/infill", json={**body, "stream": True},
                      timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == out["content"]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["tokens_predicted"] == out["tokens_predicted"]

    # Other files as context, a start for the middle, a stop string, fewer fields.
    extra = [{"filename": "geometry.py", "text": "PI = 3.14159"},
             {"filename": "util.py", "text": "def sq(x):\n    return x * x\n", "time": 1}]
    hand = ([tok.bos_id] + tok.encode("PI = 3.14159\n") + tok.encode(extra[1]["text"])
            + [base] + tok.encode(PREFIX) + [base + 1] + tok.encode(SUFFIX) + [base + 2]
            + tok.encode("a = "))
    ids = reference.generate_tokens([hand], 16)[0]
    text = tok.decode(ids[:-1] if ids[-1] in reference.fim_end_ids() else ids,
                      errors="replace")
    r = httpx.post(server.url + "/infill", json={
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
        "prompt": "a = ", "n_predict": 16, "temperature": 0,
        "response_fields": ["content", "timings/prompt_n", "tokens_evaluated", "nope"]},
        timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"content": text, "timings/prompt_n": len(hand),
                        "tokens_evaluated": len(hand)}
    assert len(text) > 2  # a stop string inside the text cuts it there
    word = text[1:3]
    r = httpx.post(server.url + "/infill", json={
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
        "prompt": "a = ", "n_predict": 16, "temperature": 0, "stop": [word]}, timeout=60)
    assert r.json()["content"] == text[:text.index(word)]
    assert (r.json()["stop_type"], r.json()["stopping_word"]) == ("word", word)


@pytest.mark.parametrize("body, param, code", [
    ({"input_prefix": 5}, "input_prefix", None),
    ({"input_prefix": "x", "n_predict": 0}, "n_predict", None),
    ({"input_prefix": "x", "n_predict": 10**6}, "input_prefix", "context_length_exceeded"),
    ({"input_prefix": "x", "input_extra": [{"file": "a"}]}, "input_extra", None),
    ({"input_prefix": "x", "min_p": 0.1}, "min_p", "unknown_field"),
    ({"input_prefix": "x", "seed": -2}, "seed", None),
])
def test_bad_infill_requests_are_400s(server, body, param, code):
    r = httpx.post(server.url + "/infill", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


def test_a_model_without_fim_tokens_answers_400(plain_server):
    r = httpx.post(plain_server.url + "/infill", json={"input_prefix": "x",
                                                        "input_suffix": "y"}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_fim_tokens" and "fill-in-the-middle" in err["message"]
    r = httpx.post(plain_server.url + "/v1/completions",
                   json={"prompt": "x", "suffix": "y", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_fim_tokens"
    assert r.json()["error"]["param"] == "suffix"
    r = httpx.post(plain_server.url + "/v1/completions",
                   json={"prompt": "x", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200  # and it still serves plain completions
