"""Running the app: `spark serve` in the foreground, or a server thread on loopback for
tests and the benchmark."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from spark_model.api import SparkModel

DEFAULT_CAPACITY = 4096  # KV positions per slot: every slot holds a full cache row
DEFAULT_PREFIX_CACHE_MB = 256  # `spark serve`'s prefix cache (ServerThread's default: off)
# uvicorn's sans-I/O binding of `websockets`: the same protocol code without the legacy
# asyncio layer, about 60 us less per request round trip on loopback.
WS_IMPL = "websockets-sansio"


def build(model: SparkModel, **kw):
    from spark_model.serve.app import create_app

    return create_app(model, **kw)


def serve(model: SparkModel, *, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, max_queue: int = 64, log_level: str = "info",
          prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
          speculative: "str | SparkModel | None" = None,
          draft_tokens: int = 7) -> None:
    """Serve until interrupted."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO))
    app = build(model, max_batch=max_batch, max_queue=max_queue,
                prefix_cache_mb=prefix_cache_mb, speculative=speculative,
                draft_tokens=draft_tokens)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws=WS_IMPL,
                ws_max_size=1 << 20)


class ServerThread:
    """A server on 127.0.0.1 in a background thread (port 0: a free one is picked).

        with ServerThread(model, max_batch=4) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, model: SparkModel, *, port: int = 0, warmup: bool = True, **kw):
        app = build(model, warmup=warmup, **kw)
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                ws=WS_IMPL, ws_max_size=1 << 20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="spark-server",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 600  # warm-up compiles first
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
