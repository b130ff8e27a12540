"""POST /infill: fill-in-the-middle in the request and answer format of llama.cpp's server,
which editor plugins speak.

Request: `input_prefix` and `input_suffix` (the text around the gap), `input_extra` (other
files as context: a list of {"filename", "text"}), `prompt` (text the infill must start
with, after the middle marker), `n_predict` (-1: all the room the capacity leaves),
`temperature`, `top_k`, `top_p`, `seed`, `stop`, `stream`, `ignore_eos`, and
`response_fields` (answer only these fields; "timings/prompt_n" lifts a nested one to the
top under that name). Defaults are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95).
Fields that tune llama.cpp's own machinery are accepted and have no effect here (IGNORED);
anything else is a 400 naming it.

Answer: {"content", "stop": true, "stop_type": "eos" | "limit" | "word", "stopping_word",
"tokens_predicted", "tokens_evaluated", "tokens_cached", "truncated", "timings", "model",
"generation_settings"}. Streamed, each new piece of text is a server-sent event
{"content": ..., "stop": false}, and the last event is the whole answer with empty content.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from spark_model.serve import protocol
from spark_model.serve.bridge import Submitted
from spark_model.serve.scheduler import Job
from spark_model.serve.slots import STOP_WIDTH

FIELDS = {"input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "temperature",
          "top_k", "top_p", "seed", "stop", "stream", "ignore_eos", "response_fields", "model"}
# llama.cpp options editor plugins send that tune its own machinery: accepted, no effect.
IGNORED = {"cache_prompt", "samplers", "n_indent", "t_max_prompt_ms", "t_max_predict_ms",
           "penalty_last_n", "id_slot", "timings_per_token", "return_tokens"}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}  # llama.cpp's


def _text(body: dict, name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise protocol.bad(f"'{name}' must be a string", name)
    return value


def _extra(body: dict) -> list[tuple[str, str]]:
    chunks = body.get("input_extra") or []
    if not isinstance(chunks, list):
        raise protocol.bad("'input_extra' must be a list of {filename, text} objects",
                           "input_extra")
    out = []
    for k, c in enumerate(chunks):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str) \
                or not isinstance(c.get("filename", ""), str) \
                or set(c) - {"filename", "text", "time"}:
            raise protocol.bad(f"input_extra[{k}] must be an object with a string 'text' and "
                               f"an optional string 'filename'", "input_extra")
        out.append((c.get("filename", ""), c["text"]))
    return out


def parse(body: Any, limits: protocol.Limits) -> tuple[Job, dict]:
    """Check an /infill request; returns its engine Job and the settings to echo back."""
    protocol._check_head(body, limits, FIELDS | IGNORED)
    prefix, suffix, middle = (_text(body, n) for n in ("input_prefix", "input_suffix",
                                                        "prompt"))
    ids = protocol.infill_ids(limits, prefix, suffix, middle, _extra(body), "input_prefix")
    n_predict = body.get("n_predict", -1)
    if not protocol._is_int(n_predict) or not (n_predict == -1 or n_predict >= 1):
        raise protocol.bad(f"'n_predict' must be -1 (until the capacity) or an integer >= 1, "
                           f"got {n_predict!r}", "n_predict")
    max_tokens = limits.capacity - len(ids) if n_predict == -1 else n_predict
    if max_tokens < 1 or len(ids) + max_tokens > limits.capacity:
        raise protocol.bad(f"the infill prompt is {len(ids)} tokens and n_predict is "
                           f"{n_predict}: over the capacity of {limits.capacity} tokens",
                           "input_prefix", "context_length_exceeded")
    temperature = protocol._number(body, "temperature", DEFAULTS["temperature"], 0.0, 2.0)
    top_p = protocol._number(body, "top_p", DEFAULTS["top_p"], 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k", DEFAULTS["top_k"])
    if not protocol._is_int(top_k) or top_k < 0:
        raise protocol.bad(f"'top_k' must be an integer >= 0 (0: off), got {top_k!r}", "top_k")
    seed = body.get("seed", -1)
    if seed == -1 or seed is None:
        seed = secrets.randbits(32)
    elif not protocol._is_int(seed) or not 0 <= seed < 2**32:
        raise protocol.bad(f"'seed' must be -1 (random) or an integer in [0, 2**32), got "
                           f"{seed!r}", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > protocol.MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s.encode("utf-8")) <= STOP_WIDTH for s in stop):
        raise protocol.bad(f"'stop' must be a list of at most {protocol.MAX_STOPS} strings "
                           f"of 1 to {STOP_WIDTH} UTF-8 bytes", "stop")
    for name in ("stream", "ignore_eos"):
        if not isinstance(body.get(name, False), bool):
            raise protocol.bad(f"'{name}' must be true or false", name)
    fields = body.get("response_fields")
    if fields is not None and (not isinstance(fields, list)
                               or not all(isinstance(f, str) for f in fields)):
        raise protocol.bad("'response_fields' must be a list of field names", "response_fields")
    job = Job(ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
              top_k=top_k, seed=seed, stop=tuple(stop), fim=True,
              ignore_eos=body.get("ignore_eos", False))
    settings = {"n_predict": n_predict, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "seed": seed, "stop": stop, "stream": body.get("stream", False),
                "ignore_eos": job.ignore_eos, "n_ctx": limits.capacity}
    return job, settings


def _final(text: str, event: dict, st, settings: dict) -> dict:
    usage = event["usage"]
    n_new, n_prompt = usage["completion_tokens"], usage["prompt_tokens"]
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    ttft, total = event["ttft_ms"], event["engine_ms"]
    stop_type = ("word" if event.get("stop_word") else "eos" if event.get("hit_end")
                 else "limit")
    predicted_ms = max(total - ttft, 0.0)
    return {"content": text, "stop": True, "model": st.limits.model_id,
            "stop_type": stop_type, "stopping_word": event.get("stop_word") or "",
            "tokens_predicted": n_new, "tokens_evaluated": n_prompt, "tokens_cached": cached,
            "truncated": False,
            "timings": {"prompt_n": n_prompt - cached, "prompt_ms": ttft,
                        "prompt_per_second": (n_prompt - cached) / ttft * 1e3 if ttft else 0.0,
                        "predicted_n": n_new, "predicted_ms": predicted_ms,
                        "predicted_per_second": (n_new - 1) / predicted_ms * 1e3
                        if predicted_ms and n_new > 1 else 0.0},
            "generation_settings": settings}


def _select(answer: dict, fields: list[str] | None) -> dict:
    """Only the asked-for fields; a path "a/b" takes answer["a"]["b"] under the name "a/b"."""
    if fields is None:
        return answer
    out = {}
    for f in fields:
        node: Any = answer
        for part in f.split("/"):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            out[f] = node
    return out


async def infill(request: Request):
    st = request.app.state
    body = protocol.parse_json(await request.body())
    job, settings = parse(body, st.limits)
    fields = body.get("response_fields")
    submitted = Submitted(st.engine, job)
    if settings["stream"]:
        return StreamingResponse(_events(submitted, st, settings, fields),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, final = await submitted.collect()
    return JSONResponse(_select(_final(text, final, st, settings), fields))


async def _events(submitted: Submitted, st, settings: dict, fields):
    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for event in submitted.events():
            if event["type"] == "delta":
                yield line({"content": event["text"], "stop": False})
            elif event["type"] == "error":
                yield line(protocol.internal(event["message"]).body())
                return
            else:
                yield line(_select(_final("", event, st, settings), fields))
    finally:
        submitted.close()
