"""The ASGI application: one engine shared by the HTTP routes and the WebSocket."""

from __future__ import annotations

import contextlib
import gc
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from spark_model.api import SparkModel
from spark_model.serve import http_api, infill_api, protocol, websocket
from spark_model.serve.scheduler import Engine

log = logging.getLogger("spark.serve")


async def _api_error(request: Request, exc: protocol.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the OpenAI shape."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(protocol.APIError(exc.status_code, f"{request.method} "
                                          f"{request.url.path}: {exc.detail}",
                                          code=kind).body(),
                        status_code=exc.status_code)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(protocol.internal(f"internal error: {type(exc).__name__}").body(),
                        status_code=500)


def create_app(model: SparkModel, *, max_batch: int = 8, max_queue: int = 64,
               model_id: str | None = None, warmup: bool = True,
               prefix_cache_mb: float = 0, speculative: "str | SparkModel | None" = None,
               draft_tokens: int = 7) -> Starlette:
    """The app; its engine thread starts and stops with the app's lifespan. warmup
    compiles the programs short prompts need before the first request arrives.
    prefix_cache_mb: memory for the keys and values of recent prompts (0: no prefix cache;
    `spark_model.serve.prefix_cache`). speculative: "prompt_lookup" makes requests
    draft `draft_tokens` (1..8) tokens per step from their context
    (`spark_model.serve.spec_slots`), a SparkModel with the same tokenizer drafts them
    (`spark_model.serve.draft_slots`); None: plain decoding."""
    if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) \
            or not prefix_cache_mb >= 0:
        raise ValueError(f"the prefix cache budget must be a number of MiB >= 0 (0: off), "
                         f"got {prefix_cache_mb!r}")
    draft = speculative if isinstance(speculative, SparkModel) else None
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_bytes=int(prefix_cache_mb * 2**20),
                    speculative_method="draft_model" if draft is not None else speculative,
                    draft_tokens=draft_tokens, draft_model=draft)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if warmup:
            t0 = time.perf_counter()
            engine.warmup(prompt_buckets=(8, 16, 32, 64))
            log.info("compiled the engine in %.1f s", time.perf_counter() - t0)
        # Everything alive now (the model, compiled programs, modules) lives as long as the
        # server: moved out of the collector's view, a full collection no longer walks it
        # (one took about 110 ms on the development machine: a pause for every client).
        gc.collect()
        gc.freeze()
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(
        routes=[Route("/health", http_api.health),
                Route("/v1/models", http_api.list_models),
                Route("/v1/models/{model:path}", http_api.get_model),
                Route("/v1/completions", http_api.completions, methods=["POST"]),
                Route("/v1/chat/completions", http_api.chat_completions, methods=["POST"]),
                Route("/infill", infill_api.infill, methods=["POST"]),
                WebSocketRoute("/v1/ws", websocket.endpoint)],
        exception_handlers={protocol.APIError: _api_error, HTTPException: _http_error,
                            Exception: _internal},
        lifespan=lifespan)
    name = model_id or (model.path.name if model.path is not None else "spark")
    app.state.engine = engine
    app.state.limits = protocol.Limits(name, model.tokenizer, model.capacity,
                                       engine.draft_tokens)
    app.state.created = int(time.time())
    return app
