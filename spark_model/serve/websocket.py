"""The persistent WebSocket at /v1/ws: many requests, possibly overlapping, on one
connection.

Client frames (JSON, text or binary):
    {"type": "request", "id": ID, "prompt": ..., "max_tokens": ..., ...}   start one
    {"type": "cancel", "id": ID}                                          stop one
Server frames:
    {"type": "delta", "id": ID, "text": ...}                              new text
    {"type": "done", "id": ID, "finish_reason": ..., "usage": {...},
     "ttft_ms": ..., "engine_ms": ...,                                   the end
     "speculative": {"drafted_tokens": ..., "accepted_tokens": ...}}      (if the server
                                                                          speculates)
    {"type": "error", "id": ID or null, "status": 400|404|429|500, "error": {...}}

ID is a string or integer chosen by the client, unique among its requests in flight.
A bad frame gets an error frame and the connection keeps serving. Cancelling ends the
request with finish_reason "cancelled". Closing the connection cancels everything on it.
"""

from __future__ import annotations

import asyncio
import json

from starlette.websockets import WebSocket, WebSocketDisconnect

from spark_model.serve import protocol
from spark_model.serve.bridge import Submitted


async def endpoint(ws: WebSocket) -> None:
    st = ws.app.state
    await ws.accept()
    live: dict[str | int, Submitted] = {}
    tasks: set[asyncio.Task] = set()
    lock = asyncio.Lock()  # frames from overlapping requests must not interleave

    async def send(obj: dict) -> None:
        async with lock:
            await ws.send_text(json.dumps(obj))

    async def error(rid, e: protocol.APIError) -> None:
        await send({"type": "error", "id": rid, "status": e.status, **e.body()})

    async def pump(rid, sub: Submitted) -> None:
        try:
            async for event in sub.events():
                if event["type"] == "delta":
                    await send({"type": "delta", "id": rid, "text": event["text"]})
                elif event["type"] == "error":
                    await error(rid, protocol.internal(event["message"]))
                else:
                    done = {k: event[k] for k in ("finish_reason", "usage", "ttft_ms",
                                                  "engine_ms")}
                    if event["speculative"] is not None:
                        done["speculative"] = event["speculative"]
                    await send({"type": "done", "id": rid, **done})
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client has gone; close() below frees the slot
        finally:
            sub.close()
            if live.get(rid) is sub:
                del live[rid]

    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            rid = None
            try:
                raw = message.get("text")
                frame = protocol.parse_json(raw if raw is not None else message.get("bytes"))
                if not isinstance(frame, dict):
                    raise protocol.bad("a frame must be a JSON object")
                rid = frame.get("id")
                if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
                    rid = None
                    raise protocol.bad("every frame needs an 'id': a non-empty string or an "
                                       "integer", "id")
                kind = frame.get("type")
                if kind == "cancel":
                    if set(frame) - {"type", "id"}:
                        raise protocol.bad("a cancel frame holds only 'type' and 'id'")
                    if rid not in live:
                        raise protocol.bad(f"no request {rid!r} in flight", "id",
                                           "unknown_id")
                    live[rid].close()
                elif kind == "request":
                    if rid in live:
                        raise protocol.bad(f"request {rid!r} is already in flight", "id",
                                           "duplicate_id")
                    job = protocol.parse_completion(frame, st.limits, protocol.WS_FIELDS)
                    sub = live[rid] = Submitted(st.engine, job)
                    task = asyncio.create_task(pump(rid, sub))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    raise protocol.bad(f"'type' must be 'request' or 'cancel', got {kind!r}",
                                       "type")
            except protocol.APIError as e:
                await error(rid, e)
    except WebSocketDisconnect:
        pass
    finally:
        for sub in list(live.values()):
            sub.close()
        for task in list(tasks):
            task.cancel()
