"""Serving: an OpenAI-compatible HTTP API and a persistent WebSocket over one batching
decode engine.

    slots.py      the compiled batch: admit a prompt into a slot, decode the busy slots
    scheduler.py  the engine thread: bounded queue, admission, retirement, cancellation
    prefix_cache.py  keys and values of recent prompts, in blocks, reused by later requests
    protocol.py   request validation and OpenAI-shaped errors
    bridge.py     asyncio <-> engine thread
    http_api.py   /v1/completions and /v1/chat/completions (with server-sent events),
                  /v1/models, /health
    infill_api.py  /infill: fill-in-the-middle in llama.cpp's format
    websocket.py  /v1/ws: many overlapping requests on one connection
    app.py        the Starlette app; server.py runs it with uvicorn (`spark serve`)
"""
