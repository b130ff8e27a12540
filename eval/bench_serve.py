"""`spark bench serve`: latency outside the model, TTFT under load, and throughput.

It starts `spark serve` as a separate process on loopback (so client and server do not
share an interpreter) and measures, from the client side:

  1. per-request overhead outside the model: the same short greedy request (1 new token)
     over a new HTTP connection each time, over one kept-alive HTTP connection, and over
     one persistent WebSocket. Overhead = round trip minus the server's own time for the
     request in the engine (submit to final token, reported with each response). The same
     three are then timed against `eval.serve_floor`, an app on the same stack that does
     no work: the floor the transport layers set on this machine;
  2. time to first token (send -> first text frame) at 1, 8 and 32 concurrent clients,
     each on its own WebSocket, each sending 64-token greedy requests back to back;
  3. total generated tokens per second at those concurrencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import websockets
from websockets.sync.client import connect as ws_connect

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):\n    print(", "# parse the arguments\n",
           "def read_file(path):\n    with open(path) as f:", "x = {", "try:\n    import json"]
SHORT = {"prompt": "def f(x):", "max_tokens": 1, "temperature": 0}
OVERHEAD_RUNS = 200
LOAD_TOKENS = 64
LOAD = {1: 30, 8: 15, 32: 8}  # clients: requests per client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(checkpoint, port: int, max_batch: int) -> list[str]:
    cmd = [sys.executable, "-m", "spark_model.cli", "serve", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"]
    return cmd + (["--checkpoint", str(checkpoint)] if checkpoint else [])


def _start_server(cmd: list[str], port: int) -> subprocess.Popen:
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600  # loading and compiling come first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read().decode()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up")


def _post(conn: http.client.HTTPConnection, body: bytes) -> float:
    """One request; returns the server's engine time in seconds."""
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return float(r.getheader("x-spark-engine-ms")) / 1e3


def overhead(port: int, runs: int = OVERHEAD_RUNS) -> dict:
    body = json.dumps(SHORT).encode()

    def new_connection():
        conn = http.client.HTTPConnection("127.0.0.1", port)
        try:
            return _post(conn, body)
        finally:
            conn.close()

    frame = json.dumps({"type": "request", "id": 0, **SHORT})
    samples = {k: [] for k in ("new_http_connection", "kept_alive_http",
                               "persistent_websocket")}
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port)) as kept, \
            ws_connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None) as ws:

        def websocket():
            ws.send(frame)
            while (reply := json.loads(ws.recv()))["type"] != "done":
                assert reply["type"] == "delta", reply
            return reply["engine_ms"] / 1e3

        ways = {"new_http_connection": new_connection,
                "kept_alive_http": lambda: _post(kept, body), "persistent_websocket": websocket}
        for i in range(runs + 20):  # interleaved, so drift hits all three alike
            for name, fn in ways.items():
                t0 = time.perf_counter()
                engine_s = fn()
                total = time.perf_counter() - t0
                if i >= 20:  # the first rounds warm connections and caches
                    samples[name].append((total, total - engine_s))
    out = {}
    for name, pairs in samples.items():
        total, over = zip(*pairs)
        out[name] = {"round_trip_ms": statistics.median(total) * 1e3,
                     "overhead_ms": statistics.median(over) * 1e3}
    new, wsock = out["new_http_connection"]["overhead_ms"], out["persistent_websocket"][
        "overhead_ms"]
    out["websocket_overhead_vs_new_connection"] = wsock / new
    return out


async def ws_round_trip(ws, request: dict) -> tuple[float, dict]:
    """Send one WebSocket request and read its frames to the end: seconds to the first
    text (to the end when there was none) and the final "done" frame."""
    await ws.send(json.dumps(request))
    t0 = time.perf_counter()
    first = None
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "delta" and first is None:
            first = time.perf_counter() - t0
        elif frame["type"] == "done":
            return (first if first is not None else time.perf_counter() - t0), frame
        elif frame["type"] == "error":
            raise RuntimeError(f"the server answered {frame}")


async def _client(port: int, k: int, n_requests: int, ttfts: list, tokens: list) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None) as ws:
        for j in range(n_requests):
            first, frame = await ws_round_trip(ws, {
                "type": "request", "id": j, "prompt": PROMPTS[(k + j) % len(PROMPTS)],
                "max_tokens": LOAD_TOKENS, "temperature": 0, "ignore_eos": True})
            ttfts.append(first)
            tokens.append(frame["usage"]["completion_tokens"])


def load(port: int, clients: int, per_client: int) -> dict:
    async def run(n):
        ttfts, tokens = [], []
        t0 = time.perf_counter()
        await asyncio.gather(*[_client(port, k, n, ttfts, tokens) for k in range(clients)])
        return ttfts, tokens, time.perf_counter() - t0

    asyncio.run(run(2))  # warm-up: connections, every prompt bucket and batch width
    ttfts, tokens, wall = asyncio.run(run(per_client))
    ms = np.array(ttfts) * 1e3
    return {"clients": clients, "requests": len(ttfts), "ttft_median_ms": float(np.median(ms)),
            "ttft_p99_ms": float(np.percentile(ms, 99)), "tokens": int(sum(tokens)),
            "seconds": wall, "tokens_per_s": sum(tokens) / wall}


def _stopped(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def _print_overhead(over: dict) -> None:
    for name in ("new_http_connection", "kept_alive_http", "persistent_websocket"):
        o = over[name]
        print(f"   {name:22s} overhead {o['overhead_ms']:7.3f} ms   "
              f"(round trip {o['round_trip_ms']:7.3f} ms)")


def main(checkpoint=None, json_path=None, max_batch: int = 8) -> int:
    port = _free_port()
    t0 = time.perf_counter()
    proc = _start_server(_serve_cmd(checkpoint, port, max_batch), port)
    print(f"server up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f} s "
          f"(max batch {max_batch})", flush=True)
    try:
        over = overhead(port)
        loads = {c: load(port, c, n) for c, n in LOAD.items()}
    finally:
        _stopped(proc)
    port = _free_port()
    proc = _start_server([sys.executable, "-m", "eval.serve_floor", "--port", str(port)], port)
    try:
        floor = overhead(port)
    finally:
        _stopped(proc)

    print(f"\n1. Overhead outside the model, {SHORT['max_tokens']}-token greedy request, "
          f"median of {OVERHEAD_RUNS} (round trip minus the engine's own time):")
    _print_overhead(over)
    ratio = over["websocket_overhead_vs_new_connection"]
    print(f"   WebSocket overhead = {ratio:.1%} of a new connection's "
          f"(a {1 - ratio:.0%} reduction; target <= 20%: {'met' if ratio <= 0.2 else 'MISSED'})")
    print("   The same requests against an app on the same stack that does no work "
          "(eval.serve_floor):")
    _print_overhead(floor)
    print(f"   WebSocket = {floor['websocket_overhead_vs_new_connection']:.1%} of a new "
          f"connection there: the floor this stack and these clients set on this machine")
    print(f"\n2-3. {LOAD_TOKENS}-token greedy requests, one WebSocket per client:")
    print("   clients  requests  TTFT median   TTFT p99   tokens/s")
    for c, r in loads.items():
        print(f"   {c:7d}  {r['requests']:8d}  {r['ttft_median_ms']:8.2f} ms "
              f"{r['ttft_p99_ms']:8.2f} ms  {r['tokens_per_s']:9.0f}")
    ttft_x = loads[8]["ttft_median_ms"] / loads[1]["ttft_median_ms"]
    tps_x = loads[8]["tokens_per_s"] / loads[1]["tokens_per_s"]
    print(f"   TTFT at 8 clients = {ttft_x:.2f}x a lone client's "
          f"(target <= 2x: {'met' if ttft_x <= 2 else 'MISSED'})")
    print(f"   tokens/s at 8 clients = {tps_x:.2f}x a lone client's "
          f"(target >= 3x: {'met' if tps_x >= 3 else 'MISSED'})")
    if json_path:
        from pathlib import Path

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({
            "max_batch": max_batch, "overhead": over, "stack_floor": floor,
            "load": {str(c): r for c, r in loads.items()},
            "ttft_8_vs_1": ttft_x, "tokens_per_s_8_vs_1": tps_x}, indent=2))
    return 0
