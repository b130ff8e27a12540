"""OpenAI-compatible HTTP routes: /v1/completions (plain or server-sent events),
/v1/models, /health."""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from spark_model.serve import protocol
from spark_model.serve.bridge import Submitted


def _state(request: Request):
    return request.app.state


async def health(request: Request) -> JSONResponse:
    st = _state(request)
    return JSONResponse({"status": "ok", "model": st.limits.model_id, **st.engine.stats()})


def _model_card(st) -> dict:
    return {"id": st.limits.model_id, "object": "model", "created": st.created,
            "owned_by": "spark"}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> JSONResponse:
    st = _state(request)
    name = request.path_params["model"]
    if name != st.limits.model_id:
        raise protocol.APIError(404, f"the model {name!r} does not exist", param="model",
                                code="model_not_found")
    return JSONResponse(_model_card(st))


async def completions(request: Request):
    st = _state(request)
    body = protocol.parse_json(await request.body())
    job = protocol.parse_completion(body, st.limits, protocol.HTTP_FIELDS)
    submitted = Submitted(st.engine, job)  # 429 here if the queue is full
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": st.limits.model_id}
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(submitted, head, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts, final = [], None
    try:
        async for event in submitted.events():
            if event["type"] == "delta":
                parts.append(event["text"])
            elif event["type"] == "error":
                raise protocol.internal(event["message"])
            else:
                final = event
    finally:
        submitted.close()
    choice = {"text": "".join(parts), "index": 0, "logprobs": None,
              "finish_reason": final["finish_reason"]}
    return JSONResponse({**head, "choices": [choice], "usage": final["usage"]},
                        headers={"x-spark-engine-ms": f"{final['engine_ms']:.3f}",
                                 "x-spark-ttft-ms": f"{final['ttft_ms']:.3f}"})


def _chunk(head: dict, text: str, finish_reason: str | None) -> dict:
    return {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                 "finish_reason": finish_reason}]}


async def _sse(submitted: Submitted, head: dict, include_usage: bool):
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then
    `data: [DONE]`. If the client disconnects, Starlette cancels this generator and the
    `finally` frees the slot."""
    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for event in submitted.events():
            if event["type"] == "delta":
                yield line(_chunk(head, event["text"], None))
            elif event["type"] == "error":
                yield line(protocol.internal(event["message"]).body())
                return
            else:
                yield line({**_chunk(head, "", event["finish_reason"]),
                            "spark": {"ttft_ms": event["ttft_ms"],
                                      "engine_ms": event["engine_ms"]}})
                if include_usage:
                    yield line({**head, "choices": [], "usage": event["usage"]})
        yield "data: [DONE]\n\n"
    finally:
        submitted.close()
