"""Request validation and error objects shared by the HTTP and WebSocket front ends.

Errors follow the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, with
the status code that goes with them: 400 bad input, 404 unknown route or model, 429 busy,
500 internal. Requests are checked field by field, so every message names the field at
fault; unknown fields are rejected rather than silently ignored, since a misspelt
`max_token` would otherwise fall back to a default the caller never chose.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from spark_model import chat, fim
from spark_model.serve.scheduler import Job
from spark_model.serve.slots import STOP_WIDTH

MAX_STOPS = 4  # as OpenAI's completions endpoint allows
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields a completion request may carry. `top_k`, `ignore_eos` and `speculative` are
# extensions (the benchmark uses ignore_eos to get exact lengths; `speculative`: false turns
# the server's speculative decoding off for the request); the rest are OpenAI's (`suffix`:
# the text after the gap, for fill-in-the-middle).
COMMON_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                 "seed", "ignore_eos", "suffix", "speculative"}
HTTP_FIELDS = COMMON_FIELDS | {"stream", "stream_options", "n", "user"}
WS_FIELDS = COMMON_FIELDS | {"type", "id"}
# /v1/chat/completions: `messages` in place of `prompt`; `top_k` is the one extension.
CHAT_FIELDS = {"model", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop",
               "seed", "stream", "stream_options", "n", "user", "speculative"}


class APIError(Exception):
    """An error to answer with: an HTTP status and an OpenAI-shaped error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def busy(message: str) -> APIError:
    return APIError(429, f"server busy: {message}", type="server_busy", code="busy")


def internal(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def parse_json(raw: bytes | str) -> Any:
    """Decode a JSON body or frame; non-UTF-8 bytes and malformed JSON are 400s."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"the body is not valid UTF-8 (byte {e.start})", code="invalid_utf8")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                  code="invalid_json")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
            or x > hi or x < lo or (lo_open and x == lo):
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be a number in {span}, got {x!r}", name)
    return float(x)


class Limits:
    """What the running model allows: its name, tokenizer and KV-cache capacity, and the
    draft length of its speculative decoding (None: the server does not speculate)."""

    def __init__(self, model_id: str, tokenizer, capacity: int,
                 draft_tokens: int | None = None):
        self.model_id, self.tokenizer, self.capacity = model_id, tokenizer, capacity
        self.draft_tokens = draft_tokens


def _check_head(body: Any, limits: Limits, allowed: set[str]) -> None:
    """A JSON object of known fields, naming this server's model if it names one."""
    if not isinstance(body, dict):
        raise bad(f"the request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))}; supported fields: "
                  f"{', '.join(sorted(allowed))}", unknown[0], "unknown_field")
    model = body.get("model")
    if model is not None and model != limits.model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{limits.model_id!r}", param="model", code="model_not_found")


def _speculative(body: dict, limits: Limits) -> bool | None:
    """The request's `speculative` field: absent or null (draft when the server
    speculates), false (never), or true (must draft: a 400 when the server does not)."""
    x = body.get("speculative")
    if x is None or x is False:
        return x
    if x is not True:
        raise bad(f"'speculative' must be true, false or null, got {x!r}", "speculative")
    if limits.draft_tokens is None:
        raise bad("this server does not decode speculatively (start it with "
                  "--speculative prompt_lookup or --draft-model MODEL)", "speculative")
    return True


def _settings(body: dict, default_max_tokens: int | None) -> dict:
    """The sampling, stop and streaming fields both endpoints share, checked; the Job's
    keyword arguments (max_tokens None: the caller fills in its default)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < 0:
        raise bad(f"'top_k' must be an integer >= 0 (0: off), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)  # unseeded requests differ from each other
    elif not _is_int(seed) or not 0 <= seed < 2**32:
        raise bad(f"'seed' must be an integer in [0, 2**32), got {seed!r}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s.encode("utf-8")) <= STOP_WIDTH for s in stop):
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOPS} strings of "
                  f"1 to {STOP_WIDTH} UTF-8 bytes", "stop")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad("only n=1 is supported", "n")
    if "stream" in body and not isinstance(body["stream"], (bool, type(None))):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise bad("'stream_options' may only hold 'include_usage'", "stream_options")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                seed=seed, stop=tuple(stop))


def _check_fits(ids: list[int], max_tokens: int, limits: Limits, param: str) -> None:
    if len(ids) + max_tokens > limits.capacity:
        raise bad(f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: "
                  f"together over the capacity of {limits.capacity} tokens",
                  param, "context_length_exceeded")


def parse_completion(body: Any, limits: Limits, allowed: set[str]) -> Job:
    """Check a completion request and turn it into an engine Job (sink not yet set)."""
    _check_head(body, limits, allowed)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the one-element list OpenAI clients may send
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or a list of one string)", "prompt")
    settings = _settings(body, DEFAULT_MAX_TOKENS)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false", "ignore_eos")
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise bad("'suffix' must be a string", "suffix")
        ids = infill_ids(limits, prompt, suffix)
    else:
        try:
            ids = limits.tokenizer.encode(prompt, bos=True)
        except Exception as e:  # e.g. a lone surrogate from a JSON "\ud800" escape
            raise bad(f"cannot tokenize the prompt: {e}", "prompt")
    if not ids:
        raise bad("the prompt is empty and this model adds no BOS token: give at least "
                  "one character", "prompt")
    _check_fits(ids, settings["max_tokens"], limits, "prompt")
    return Job(ids=ids, ignore_eos=ignore_eos, fim=suffix is not None,
               speculative=_speculative(body, limits), **settings)


def infill_ids(limits: Limits, prefix: str, suffix: str, middle: str = "",
               extra: list[tuple[str, str]] | tuple = (), param: str = "suffix") -> list[int]:
    """The fill-in-the-middle prompt (`spark_model.fim.prompt_ids`); 400 `no_fim_tokens`
    for a model without infilling tokens, 400 for text the tokenizer refuses."""
    try:
        return fim.prompt_ids(limits.tokenizer, prefix, suffix, middle, extra)
    except fim.NoFimTokens as e:
        raise bad(str(e), param, "no_fim_tokens")
    except Exception as e:  # e.g. a lone surrogate from a JSON "\ud800" escape
        raise bad(f"cannot tokenize the request: {e}", param)


def parse_chat(body: Any, limits: Limits) -> Job:
    """Check a chat completion request, render its messages with the model's chat
    template (`spark_model.chat`) and turn it into an engine Job.

    400 for bad messages, a model without a template, or a conversation the template
    refuses (its `raise_exception`); 500 (`chat_template_error`) when the template itself
    is broken or tries what the sandbox forbids. max_tokens defaults to all the room the
    capacity leaves after the prompt (OpenAI's chat default: up to the context length).
    """
    _check_head(body, limits, CHAT_FIELDS)
    if "messages" not in body:
        raise bad("'messages' is required: a non-empty list of {role, content}", "messages")
    settings = _settings(body, None)
    try:
        ids = chat.prompt_ids(limits.tokenizer, body["messages"])
    except chat.NoChatTemplate as e:
        raise bad(str(e), "messages", "no_chat_template")
    except chat.ChatTemplateError as e:
        raise APIError(500, str(e), type="server_error", code="chat_template_error")
    except chat.ChatError as e:
        raise bad(str(e), "messages")
    except Exception as e:  # the tokenizer refused the text (a lone surrogate, ...)
        raise bad(f"cannot tokenize the conversation: {e}", "messages")
    if not ids:
        raise bad("the chat template rendered this conversation as no tokens", "messages")
    if settings["max_tokens"] is None:
        settings["max_tokens"] = max(1, limits.capacity - len(ids))
    _check_fits(ids, settings["max_tokens"], limits, "messages")
    return Job(ids=ids, speculative=_speculative(body, limits),
               **settings)
