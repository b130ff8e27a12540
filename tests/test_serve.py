"""The server with real clients on loopback: the official `openai` package, `httpx` and
`websockets`. Served text is checked against `SparkModel.generate` on the same weights."""

import asyncio
import json
import sys
import time

import httpx
import openai
import pytest
import websockets

import spark_model
from spark_model.serve.server import ServerThread

CAPACITY = 512
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):\n    print("]


@pytest.fixture(scope="module")
def reference():
    """An independently loaded model: what the server must reproduce."""
    return spark_model.load(capacity=CAPACITY)


@pytest.fixture(scope="module")
def server():
    model = spark_model.load(capacity=CAPACITY)
    with ServerThread(model, max_batch=4, max_queue=64, warmup=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_slot():
    """One slot and a one-request queue: a slot that is not freed blocks everyone."""
    model = spark_model.load(capacity=CAPACITY)
    with ServerThread(model, max_batch=1, max_queue=1, warmup=False) as srv:
        yield srv


def _finished(srv, reason: str) -> int:
    return srv.app.state.engine.finished[reason]


def _wait_idle(srv, timeout=30.0):
    engine = srv.app.state.engine
    deadline = time.monotonic() + timeout
    while engine.stats()["active"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


# ---- OpenAI-compatible HTTP ------------------------------------------------------------

def test_openai_client_streams_what_generate_returns(server, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model_id = client.models.list().data[0].id
    assert model_id == "spark-tiny"
    for prompt, n in [(PROMPTS[0], 48), (PROMPTS[2], 30)]:
        chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=n,
                                                temperature=0, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        assert text == reference.generate(prompt, n)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert len(chunks) > 2  # it really streamed
    # Not streamed, with a stop string, cut exactly where generate cuts.
    out = client.completions.create(model=model_id, prompt=PROMPTS[1], max_tokens=40,
                                    temperature=0, stop=["\n"])
    assert out.choices[0].text == reference.generate(PROMPTS[1], 40, stop=["\n"])
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPTS[1], bos=True))


def test_openai_stream_usage_and_seeded_sampling(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kw = dict(model="spark-tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0.9,
              top_p=0.95, seed=7, stream=True, stream_options={"include_usage": True})
    runs = []
    for _ in range(2):
        chunks = list(client.completions.create(**kw))
        runs.append("".join(c.choices[0].text for c in chunks if c.choices))
        assert chunks[-1].usage.completion_tokens <= 12
    assert runs[0] == runs[1]  # the same seed draws the same tokens


def test_health_models_and_unknown_routes(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(server.url + "/v1/models/spark-tiny")
    assert r.json()["id"] == "spark-tiny"
    for method, path, code in [("GET", "/v1/nowhere", 404), ("GET", "/v1/models/gpt-9", 404),
                               ("GET", "/v1/completions", 405)]:
        r = httpx.request(method, server.url + path)
        assert r.status_code == code
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"\xff\xfe{}", None, "invalid_utf8"),
    (b"[1, 2]", None, None),
    ({"prompt": "x", "max_token": 5}, "max_token", "unknown_field"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", None),
    ({"prompt": "x", "temperature": -0.1}, "temperature", None),
    ({"prompt": "x", "top_p": 0}, "top_p", None),
    ({"prompt": "x", "seed": -1}, "seed", None),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop", None),
    ({"prompt": 5}, "prompt", None),
    ({"prompt": "x " * 600, "max_tokens": 4}, "prompt", "context_length_exceeded"),
    ({"prompt": "x", "max_tokens": CAPACITY}, "prompt", "context_length_exceeded"),
])
def test_bad_http_input_is_a_400_and_the_server_keeps_serving(server, body, param, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param and err["code"] == code
    ok = httpx.post(server.url + "/v1/completions",
                    json={"prompt": "x", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_errors_by_status(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="spark-tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")


# ---- the persistent WebSocket ----------------------------------------------------------

async def _collect(ws, ids) -> dict:
    """Read frames until every id in `ids` has its final frame; returns id -> result."""
    out = {i: {"text": "", "deltas": 0} for i in ids}
    pending = set(ids)
    while pending:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
        rid = frame["id"]
        if frame["type"] == "delta":
            assert rid in pending, f"delta for {rid!r} after its end"
            out[rid]["text"] += frame["text"]
            out[rid]["deltas"] += 1
        else:
            out[rid]["final"] = frame
            pending.discard(rid)
    return out


def test_websocket_overlapping_requests_are_complete_and_attributed(server, reference):
    jobs = {f"r{i}": (PROMPTS[i % 4], 20 + 7 * i) for i in range(6)}
    jobs["same-a"] = jobs["same-b"] = (PROMPTS[0], 16)  # sampled: the seed decides

    async def run():
        async with websockets.connect(server.ws_url) as ws:
            for rid, (prompt, n) in jobs.items():
                sampled = rid.startswith("same")
                await ws.send(json.dumps({
                    "type": "request", "id": rid, "prompt": prompt, "max_tokens": n,
                    "temperature": 0.8 if sampled else 0, "seed": 3}))
            return await _collect(ws, list(jobs))

    got = asyncio.run(run())
    for rid, (prompt, n) in jobs.items():
        final = got[rid]["final"]
        assert final["type"] == "done" and final["ttft_ms"] > 0, final
        assert final["usage"]["completion_tokens"] <= n
        if not rid.startswith("same"):
            assert got[rid]["text"] == reference.generate(prompt, n), rid
    assert got["same-a"]["text"] == got["same-b"]["text"]


def test_packed_and_batched_admissions_both_reproduce_generate(server, reference):
    """Short prompts arriving together are prefilled packed into one sequence; a group
    over PACK_MAX tokens takes the batched prefill. Both must serve generate's text."""
    from spark_model.serve.scheduler import PACK_MAX

    long_prompt = "import os\n" + "x = os.path.join('a', 'b')\n" * 60
    assert len(reference.tokenizer.encode(long_prompt, bos=True)) > PACK_MAX
    groups = [{f"s{i}": (p, 12) for i, p in enumerate(PROMPTS)},  # packed: 4 short prompts
              {"long": (long_prompt, 12), "short": (PROMPTS[1], 12)}]  # batched
    timing = server.app.state.engine.timing
    for jobs, path in zip(groups, ["admit_packed_calls", "admit_batched_calls"]):
        _wait_idle(server)
        calls = timing[path]

        async def run():
            async with websockets.connect(server.ws_url) as ws:
                for rid, (prompt, n) in jobs.items():
                    await ws.send(json.dumps({"type": "request", "id": rid, "prompt": prompt,
                                              "max_tokens": n, "temperature": 0}))
                return await _collect(ws, list(jobs))

        got = asyncio.run(run())
        for rid, (prompt, n) in jobs.items():
            assert got[rid]["text"] == reference.generate(prompt, n), rid
        assert timing[path] > calls, path


def test_websocket_cancel_frees_the_slot(one_slot):
    async def run():
        async with websockets.connect(one_slot.ws_url) as ws:
            await ws.send(json.dumps({"type": "request", "id": 1, "prompt": "x",
                                      "max_tokens": 500, "ignore_eos": True,
                                      "temperature": 0}))
            first = json.loads(await ws.recv())
            assert first["type"] == "delta" and first["id"] == 1
            await ws.send(json.dumps({"type": "cancel", "id": 1}))
            while (frame := json.loads(await ws.recv()))["type"] == "delta":
                pass
            assert frame["type"] == "done" and frame["finish_reason"] == "cancelled"
            assert frame["usage"]["completion_tokens"] < 500
            await ws.send(json.dumps({"type": "request", "id": 2, "prompt": "y",
                                      "max_tokens": 3, "temperature": 0}))
            return await _collect(ws, [2])

    assert asyncio.run(run())[2]["final"]["type"] == "done"


BAD_FRAMES = [
    ("{nope", "invalid_json"),
    (json.dumps({"type": "request", "id": "a", "prompt": "x", "colour": 1}), "unknown_field"),
    (json.dumps({"type": "request", "id": "a", "prompt": "x " * 600}),
     "context_length_exceeded"),
    (json.dumps({"type": "request", "id": "a", "prompt": "x", "max_tokens": 0}), None),
    (json.dumps({"type": "request", "id": "a", "prompt": "x", "temperature": -2}), None),
    (json.dumps({"type": "request", "prompt": "x"}), None),  # no id
    (json.dumps({"type": "cancel", "id": "never-sent"}), "unknown_id"),
    (json.dumps({"type": "shout", "id": "a"}), None),
    (b"\xc3\x28 not utf-8", "invalid_utf8"),  # a binary frame with invalid UTF-8
]


def test_websocket_bad_frames_get_error_frames_and_the_connection_serves_on(server):
    async def run():
        async with websockets.connect(server.ws_url) as ws:
            errors = []
            for frame, code in BAD_FRAMES:
                await ws.send(frame)
                reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert reply["type"] == "error" and reply["status"] == 400, reply
                assert reply["error"]["message"] and reply["error"]["code"] == code
                errors.append(reply)
            await ws.send(json.dumps({"type": "request", "id": "ok", "prompt": "x",
                                      "max_tokens": 3, "temperature": 0}))
            return errors, await _collect(ws, ["ok"])

    errors, got = asyncio.run(run())
    assert len(errors) == len(BAD_FRAMES) and got["ok"]["final"]["type"] == "done"


def test_websocket_invalid_utf8_text_frame_closes_only_that_connection(server):
    """RFC 6455 requires closing on a text frame that is not UTF-8 (code 1007); the
    WebSocket layer does that before the app sees the frame. Other connections and new
    ones are unaffected."""
    async def run():
        async with websockets.connect(server.ws_url) as bystander:
            async with websockets.connect(server.ws_url) as ws:
                await ws.send(b"\xff\xfe", text=True)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 30)
                assert closed.value.rcvd.code == 1007
            await bystander.send(json.dumps({"type": "request", "id": 1, "prompt": "x",
                                             "max_tokens": 2, "temperature": 0}))
            return await _collect(bystander, [1])

    assert asyncio.run(run())[1]["final"]["type"] == "done"


# ---- faults ---------------------------------------------------------------------------

def test_clients_that_disconnect_mid_stream_free_their_slot(one_slot):
    _wait_idle(one_slot)
    before = _finished(one_slot, "cancelled")
    long = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    # HTTP: read one event of a stream, then drop the connection.
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", one_slot.url + "/v1/completions",
                           json={**long, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())

    # WebSocket: the same, by closing the connection.
    async def ws_drop():
        async with websockets.connect(one_slot.ws_url) as ws:
            await ws.send(json.dumps({"type": "request", "id": 1, **long}))
            assert json.loads(await ws.recv())["type"] == "delta"

    asyncio.run(ws_drop())
    _wait_idle(one_slot)
    assert _finished(one_slot, "cancelled") == before + 2
    r = httpx.post(one_slot.url + "/v1/completions",
                   json={"prompt": "x", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200


def test_a_full_queue_answers_busy_at_once(one_slot):
    _wait_idle(one_slot)
    long = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0}

    async def run():
        async with websockets.connect(one_slot.ws_url) as ws:
            await ws.send(json.dumps({"type": "request", "id": "running", **long}))
            assert json.loads(await ws.recv())["type"] == "delta"  # it holds the slot
            await ws.send(json.dumps({"type": "request", "id": "waiting", **long}))
            await ws.send(json.dumps({"type": "request", "id": "refused", **long}))
            async with httpx.AsyncClient(timeout=10) as client:
                t0 = time.perf_counter()
                r = await client.post(one_slot.url + "/v1/completions", json=long)
                http_s = time.perf_counter() - t0
            refused = None
            while refused is None:
                frame = json.loads(await ws.recv())
                if frame["id"] == "refused":
                    refused = frame
            for rid in ("running", "waiting"):
                await ws.send(json.dumps({"type": "cancel", "id": rid}))
            return r, http_s, refused

    r, http_s, refused = asyncio.run(run())
    assert r.status_code == 429 and r.json()["error"]["code"] == "busy"
    assert http_s < 5  # answered, not left hanging
    assert refused["type"] == "error" and refused["status"] == 429
    _wait_idle(one_slot)


@pytest.mark.slow
def test_64_concurrent_clients_all_complete(server, reference):
    """32 HTTP streaming clients and 32 WebSocket clients, 3 requests each."""
    n_tokens = 6
    expect = {p: reference.generate(p, n_tokens) for p in PROMPTS}

    async def http_client(k, client):
        texts = []
        for j in range(3):
            prompt = PROMPTS[(k + j) % 4]
            text = ""
            async with client.stream("POST", server.url + "/v1/completions", json={
                    "prompt": prompt, "max_tokens": n_tokens, "temperature": 0,
                    "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            texts.append((prompt, text))
        return texts

    async def ws_client(k):
        texts = []
        async with websockets.connect(server.ws_url) as ws:
            for j in range(3):
                prompt = PROMPTS[(k + j) % 4]
                await ws.send(json.dumps({"type": "request", "id": j, "prompt": prompt,
                                          "max_tokens": n_tokens, "temperature": 0}))
                got = await _collect(ws, [j])
                assert got[j]["final"]["type"] == "done"
                texts.append((prompt, got[j]["text"]))
        return texts

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*[http_client(k, client) for k in range(32)],
                                        *[ws_client(k) for k in range(32)])

    results = asyncio.run(run())
    assert len(results) == 64 and all(len(r) == 3 for r in results)
    for texts in results:
        for prompt, text in texts:
            assert text == expect[prompt]


def test_bench_overhead_clients_read_the_stack_floor_app():
    """`spark bench serve` times the same three request paths against `eval.serve_floor`;
    its clients must read that app's answers as they read the real server's."""
    from eval import bench_serve

    port = bench_serve._free_port()
    proc = bench_serve._start_server(
        [sys.executable, "-m", "eval.serve_floor", "--port", str(port)], port)
    try:
        over = bench_serve.overhead(port, runs=5)
    finally:
        bench_serve._stopped(proc)
    for way in ("new_http_connection", "kept_alive_http", "persistent_websocket"):
        # No engine time: the whole round trip is overhead.
        assert over[way]["overhead_ms"] == over[way]["round_trip_ms"] > 0
    assert over["websocket_overhead_vs_new_connection"] > 0
