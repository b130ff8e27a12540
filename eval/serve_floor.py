"""A server that does no work, on the same ASGI stack and settings as `spark serve`.

`spark bench serve` times its requests against this app too: what a request costs here is
the floor that the HTTP and WebSocket layers (uvicorn, Starlette, the `websockets`
protocol code, the loopback socket and the client library) set before any model work.
The routes answer in the shapes the benchmark's clients read, with an engine time of 0:

    POST /v1/completions   a one-token completion object, header x-spark-engine-ms: 0
    WS   /v1/ws            for every frame received: one "delta" frame, then one "done"

    python -m eval.serve_floor --port 8001
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from spark_model.serve.server import WS_IMPL

COMPLETION = {"object": "text_completion", "model": "floor",
              "choices": [{"index": 0, "text": " ", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def completions(request: Request) -> JSONResponse:
    json.loads(await request.body())  # read and parse the body, as the real route does
    return JSONResponse(COMPLETION, headers={"x-spark-engine-ms": "0"})


async def stream(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            frame = json.loads(await ws.receive_text())
            rid = frame.get("id")
            await ws.send_text(json.dumps({"type": "delta", "id": rid, "text": " "}))
            await ws.send_text(json.dumps({
                "type": "done", "id": rid, "finish_reason": "length",
                "usage": COMPLETION["usage"], "ttft_ms": 0.0, "engine_ms": 0.0}))
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[Route("/health", health),
                        Route("/v1/completions", completions, methods=["POST"]),
                        WebSocketRoute("/v1/ws", stream)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws=WS_IMPL,
                ws_max_size=1 << 20)


if __name__ == "__main__":
    main()
