"""From asyncio to the engine thread and back: submit a job, then await its events."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from spark_model.serve import protocol
from spark_model.serve.scheduler import Busy, Engine, Job


class Submitted:
    """A job in the engine, with the asyncio queue its events arrive on.

    Iterate it for events ({"type": "delta" | "done" | "error", ...}); it ends after
    "done" or "error". `close()` cancels the job if it has not finished (a client that
    went away must not keep its slot).
    """

    def __init__(self, engine: Engine, job: Job):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[dict] = asyncio.Queue()
        self.job = job
        self.finished = False

        def sink(event: dict) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                job.cancel()

        job.sink = sink
        try:
            engine.submit(job)
        except Busy as e:
            raise protocol.busy(str(e)) from None

    async def events(self) -> AsyncIterator[dict]:
        while not self.finished:
            event = await self._queue.get()
            self.finished = event["type"] in ("done", "error")
            yield event

    def close(self) -> None:
        if not self.finished:
            self.job.cancel()
