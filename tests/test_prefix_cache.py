"""The server's prefix cache (spark_model/serve/prefix_cache.py): greedy text with the cache
against plain `SparkModel.generate` on an independently loaded model, the tokens it reports
reused against the common whole blocks of the prompts' ids, and the index's bookkeeping
(verification under forced hash collisions, LRU eviction of leaves) on its own."""

from __future__ import annotations

import asyncio
import inspect
import json
import json.decoder
import time

import httpx
import pytest
import websockets

import spark_model
from spark_model.serve import prefix_cache
from spark_model.serve.app import create_app
from spark_model.serve.prefix_cache import BLOCK, PrefixIndex
from spark_model.serve.server import ServerThread

CAPACITY = 512
SOURCE = inspect.getsource(json.decoder)  # real code for the shared prefixes


def _common_blocks(a: list[int], b: list[int]) -> int:
    """Tokens in the whole blocks `b` can reuse from `a`: their common prefix in blocks,
    leaving at least one token of `b` to prefill."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return BLOCK * min(n // BLOCK, (len(b) - 1) // BLOCK)


# ---- the index alone ---------------------------------------------------------------------

def _ids(*blocks: int, tail: int = 5) -> list[int]:
    """A prompt of whole blocks, each filled with one value, then `tail` more tokens."""
    return [v for b in blocks for v in [b] * BLOCK] + [7] * tail


def test_lookup_returns_the_longest_verified_chain():
    idx = PrefixIndex(8)
    a = _ids(1, 2, 3)
    assert idx.lookup(a, 3) == []
    copies = idx.insert(a, [], set())
    assert [pos for _, pos in copies] == [0, BLOCK, 2 * BLOCK]
    assert [b.tokens[0] for b in idx.lookup(a, 3)] == [1, 2, 3]
    assert len(idx.lookup(a, 2)) == 2  # never more than asked
    b = _ids(1, 2, 4)
    assert [blk.tokens[0] for blk in idx.lookup(b, 3)] == [1, 2]
    c = _ids(1, 2, 3)
    c[BLOCK + 10] = 99  # one token differs inside the second block
    assert len(idx.lookup(c, 3)) == 1
    # Inserting b after its reused chain adds only its third block.
    assert [pos for _, pos in idx.insert(b, idx.lookup(b, 3), set())] == [2 * BLOCK]


def test_a_colliding_hash_never_serves_other_tokens():
    idx = PrefixIndex(8, key_fn=lambda key: 0)  # every block has the same key
    a = _ids(1, 2)
    assert len(idx.insert(a, [], set())) == 1  # the second block's key is taken: stop
    assert [b.tokens[0] for b in idx.lookup(a, 2)] == [1]
    assert idx.lookup(_ids(3, 2), 2) == []  # same key, other tokens: not reused
    assert idx.insert(_ids(3, 2), [], set()) == []


def test_eviction_takes_the_least_recently_used_leaf():
    idx = PrefixIndex(4)
    a, b = _ids(1, 2), _ids(3, 4)
    idx.insert(a, [], set())
    idx.insert(b, [], set())
    assert len(idx) == 4 and idx.counts["blocks_evicted"] == 0
    idx.lookup(a, 2)  # a is now the more recent
    c = _ids(5)
    (row, pos), = idx.insert(c, [], set())
    # b's second block was the least recently used leaf; b's first block now is one.
    assert idx.counts["blocks_evicted"] == 1
    assert [blk.tokens[0] for blk in idx.lookup(b, 2)] == [3]
    assert len(idx.lookup(a, 2)) == 2 and len(idx.lookup(c, 1)) == 1
    # A prompt's own blocks and pinned ones are never evicted for it: 4 rows, 5 blocks.
    d = _ids(6, 7, 8, 9, 10)
    pinned = {id(blk) for blk in idx.lookup(a, 2)}
    assert len(idx.insert(d, [], pinned)) == 2  # b's block and c's block made room
    assert len(idx.lookup(a, 2)) == 2 and len(idx.lookup(d, 5)) == 2


# ---- the server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return spark_model.load(capacity=CAPACITY)


@pytest.fixture(scope="module")
def server():
    with ServerThread(spark_model.load(capacity=CAPACITY), max_batch=4, warmup=False,
                      prefix_cache_mb=8) as srv:
        yield srv


def _complete(srv, prompt: str, n: int = 24) -> dict:
    r = httpx.post(srv.url + "/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_output_is_generates_and_the_shared_blocks_are_reused(server, reference):
    tok = reference.tokenizer
    base = SOURCE[:1400]
    prompts = [base + "\ndef helper(x):", base + "\nclass Thing:", base + "\nimport os\n",
               base + "\ndef helper(x):", SOURCE[2000:2600]]
    seen: list[list[int]] = []
    for p in prompts:
        out = _complete(server, p)
        assert out["choices"][0]["text"] == reference.generate(p, 24)
        ids = tok.encode(p, bos=True)
        want = max((_common_blocks(s, ids) for s in seen), default=0)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == want
        seen.append(ids)
    assert [_common_blocks(seen[0], s) > 0 for s in seen[1:]] == [True, True, True, False]
    stats = httpx.get(server.url + "/health").json()["prefix_cache"]
    assert stats["enabled"] and stats["hits"] >= 3 and stats["tokens_reused"] > 0
    assert stats["bytes_used"] == stats["blocks_used"] * prefix_cache.block_bytes(
        reference.config) <= stats["bytes_budget"]


def test_prompts_that_differ_by_one_token_recompute_the_divergent_block(server, reference):
    """Two prompts the same up to one token: the second reuses only the blocks before it,
    even when every block hashes alike (so only the stored tokens tell them apart)."""
    tok = reference.tokenizer
    a = SOURCE[3000:4200]
    ids_a = tok.encode(a, bos=True)
    at = len(tok.decode(ids_a[1:2 * BLOCK + BLOCK // 2]))  # a character in the third block
    b = a[:at] + ("Q" if a[at] != "Q" else "R") + a[at + 1:]
    ids_b = tok.encode(b, bos=True)
    same = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert 2 * BLOCK <= same < 3 * BLOCK  # the ids part inside the third block
    assert _common_blocks(tok.encode(a, bos=True), tok.encode(b, bos=True)) == 2 * BLOCK
    cache = server.app.state.engine._prefix
    saved = cache.index.key_fn
    # With every key alike, only a's first block is cached (its second block's key is
    # taken by the first), and b reuses that one block, whose tokens it shares.
    for key_fn, reused in ((saved, 2 * BLOCK), (lambda key: 0, BLOCK)):
        try:
            cache.clear()
            cache.index.key_fn = key_fn
            first = _complete(server, a)
            assert first["choices"][0]["text"] == reference.generate(a, 24)
            second = _complete(server, b)
            assert second["choices"][0]["text"] == reference.generate(b, 24)
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == reused
        finally:
            cache.clear()
            cache.index.key_fn = saved


@pytest.mark.slow
def test_64_clients_sharing_a_prefix_some_disconnecting(server, reference):
    """64 WebSocket clients at once on 4 slots, all sharing a prefix; every fourth drops
    its connection after the first delta. Each client that stays gets exactly its own
    prompt's text, the dropped requests are cancelled (their slots freed), and the server
    answers correctly afterwards."""
    base = SOURCE[5000:6300]
    endings = ["\ndef a():", "\ndef b():", "\nclass C:", "\nx = [", "\ndef a(x):",
               "\nimport re\n", "\n# done\n", "\nclass D:"]
    want = reference.generate([base + e for e in endings], 20)
    engine = server.app.state.engine
    n, drops = 64, set(range(3, 64, 4))

    async def client(k: int) -> str | None:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "request", "id": k,
                                      "prompt": base + endings[k % len(endings)],
                                      "max_tokens": 20, "temperature": 0}))
            text = ""
            while (frame := json.loads(await ws.recv()))["type"] == "delta":
                assert frame["id"] == k
                text += frame["text"]
                if k in drops:
                    return None  # closes the connection mid-stream
            assert frame["type"] == "done" and frame["id"] == k, frame
            return text

    async def run():
        return await asyncio.gather(*[client(k) for k in range(n)])

    hits = httpx.get(server.url + "/health").json()["prefix_cache"]["hits"]
    cancelled = engine.finished["cancelled"]
    results = asyncio.run(run())
    for k, text in enumerate(results):
        assert (text is None) == (k in drops)
        if text is not None:
            assert text == want[k % len(endings)], k
    deadline = time.monotonic() + 60
    while engine.stats()["active"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)
    # A dropped request may have finished before the server saw the drop: at most 16.
    assert 0 < engine.finished["cancelled"] - cancelled <= len(drops)
    assert httpx.get(server.url + "/health").json()["prefix_cache"]["hits"] > hits
    assert _complete(server, base + endings[1], 20)["choices"][0]["text"] == want[1]


@pytest.mark.slow
def test_a_small_budget_evicts_and_stays_exact(reference):
    per_block = prefix_cache.block_bytes(reference.config)
    with ServerThread(spark_model.load(capacity=CAPACITY), max_batch=2, warmup=False,
                      prefix_cache_mb=4 * per_block / 2**20) as srv:  # four blocks
        prompts = [SOURCE[k:k + 900] for k in (7000, 9000, 11000)]  # 3+ blocks each
        for p in prompts:
            assert _complete(srv, p)["choices"][0]["text"] == reference.generate(p, 24)
        stats = httpx.get(srv.url + "/health").json()["prefix_cache"]
        assert stats["blocks_total"] == 4 and stats["blocks_used"] <= 4
        assert stats["bytes_used"] <= stats["bytes_budget"] == 4 * per_block
        assert stats["blocks_evicted"] > 0
        # The latest prompt's blocks are the ones kept; the first prompt's are gone.
        last = _complete(srv, prompts[2] + "#")
        assert last["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert last["choices"][0]["text"] == reference.generate(prompts[2] + "#", 24)
        first = _complete(srv, prompts[0] + "#")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert first["choices"][0]["text"] == reference.generate(prompts[0] + "#", 24)


@pytest.mark.parametrize("mb, match", [
    (10**9, "more than the .* of memory available"),
    (0.01, "holds no block"),
    (-1, "MiB >= 0"),
])
def test_bad_budgets_are_refused(reference, mb, match):
    with pytest.raises(ValueError, match=match):
        create_app(reference, prefix_cache_mb=mb, warmup=False)


def test_health_says_when_it_is_off():
    with ServerThread(spark_model.load(capacity=128), max_batch=1, warmup=False) as srv:
        assert httpx.get(srv.url + "/health").json()["prefix_cache"] == {"enabled": False}
