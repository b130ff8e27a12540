"""OpenAI-compatible HTTP routes: /v1/completions and /v1/chat/completions (plain or
server-sent events), /v1/models, /health."""

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
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": st.limits.model_id}
    return await _answer(st, body, job, head, _text_chunk,
                         lambda text, reason: {"text": text, "index": 0, "logprobs": None,
                                               "finish_reason": reason})


async def chat_completions(request: Request):
    """OpenAI's chat completions: the messages rendered by the model's chat template
    (`spark_model.chat`), then the same engine path as /v1/completions."""
    st = _state(request)
    body = protocol.parse_json(await request.body())
    job = protocol.parse_chat(body, st.limits)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": st.limits.model_id}
    if body.get("stream"):
        head["object"] = "chat.completion.chunk"
        opening = {**head, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                        "delta": {"role": "assistant", "content": ""}}]}
        return await _answer(st, body, job, head, _chat_chunk, None, opening)
    head["object"] = "chat.completion"
    return await _answer(st, body, job, head, _chat_chunk, lambda text, reason: {
        "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
        "finish_reason": reason})


async def _answer(st, body: dict, job, head: dict, chunk, choice, opening: dict | None = None):
    """Submit the job (429 if the queue is full), then answer as server-sent events when
    the request asks to stream (`chunk(head, text, finish_reason)` formats each, `opening`
    goes first), or as one JSON object whose one choice is `choice(text, finish_reason)`."""
    submitted = Submitted(st.engine, job)
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(submitted, head, usage, chunk, opening),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, final = await submitted.collect()
    return JSONResponse({**head, "choices": [choice(text, final["finish_reason"])],
                         "usage": final["usage"]},
                        headers={"x-spark-engine-ms": f"{final['engine_ms']:.3f}",
                                 "x-spark-ttft-ms": f"{final['ttft_ms']:.3f}"})


def _text_chunk(head: dict, text: str | None, finish_reason: str | None) -> dict:
    return {**head, "choices": [{"text": text or "", "index": 0, "logprobs": None,
                                 "finish_reason": finish_reason}]}


def _chat_chunk(head: dict, text: str | None, finish_reason: str | None) -> dict:
    """A chat chunk: new text as `delta.content`; the last chunk's delta is empty."""
    delta = {} if text is None else {"content": text}
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish_reason}]}


async def _sse(submitted: Submitted, head: dict, include_usage: bool, chunk,
               opening: dict | None = None):
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then
    `data: [DONE]`. If the client disconnects, Starlette cancels this generator and the
    `finally` frees the slot."""
    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if opening is not None:
            yield line(opening)
        async for event in submitted.events():
            if event["type"] == "delta":
                yield line(chunk(head, event["text"], None))
            elif event["type"] == "error":
                yield line(protocol.internal(event["message"]).body())
                return
            else:
                spark = {"ttft_ms": event["ttft_ms"], "engine_ms": event["engine_ms"]}
                if event["speculative"] is not None:
                    spark["speculative"] = event["speculative"]
                yield line({**chunk(head, None, event["finish_reason"]), "spark": spark})
                if include_usage:
                    yield line({**head, "choices": [], "usage": event["usage"]})
        yield "data: [DONE]\n\n"
    finally:
        submitted.close()
