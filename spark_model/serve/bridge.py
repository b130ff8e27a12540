"""From asyncio to the engine thread and back: submit a job, then await its events."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import AsyncIterator, Callable

from spark_model.serve import protocol
from spark_model.serve.scheduler import Busy, Engine, Job


class _Mailbox:
    """Events from the engine thread for one event loop, handed over in bursts.

    The engine hands over its events together (one per busy slot after a decode call, a
    short request's text and its end), so the loop is woken once per burst rather than
    once per event: each wake-up is a write to the loop's self-pipe and a thread switch.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[dict], None], dict]] = []
        self._scheduled = False

    def post(self, deliver: Callable[[dict], None], event: dict) -> bool:
        """Queue an event for `deliver` on the loop (engine thread); False when the loop
        has closed and nobody is listening."""
        with self._lock:
            self._items.append((deliver, event))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # closed: later posts must fail too, so their jobs are cancelled
            with self._lock:
                self._scheduled = False
            return False
        return True

    def _drain(self) -> None:  # on the loop
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for deliver, event in items:
            deliver(event)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _Mailbox


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


class Submitted:
    """A job in the engine, with the asyncio queue its events arrive on.

    Iterate it for events ({"type": "delta" | "done" | "error", ...}); it ends after
    "done" or "error". `close()` cancels the job if it has not finished (a client that
    went away must not keep its slot).
    """

    def __init__(self, engine: Engine, job: Job):
        box = _mailbox(asyncio.get_running_loop())
        self._queue: asyncio.Queue[dict] = asyncio.Queue()
        self.job = job
        self.finished = False
        deliver = self._queue.put_nowait

        def sink(event: dict) -> None:  # runs on the engine thread
            if not box.post(deliver, event):
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

    async def collect(self) -> tuple[str, dict]:
        """A request answered whole: all its text and its "done" event (an "error" event
        is raised as an internal error); the job is cancelled if this is interrupted."""
        parts, final = [], None
        try:
            async for event in self.events():
                if event["type"] == "delta":
                    parts.append(event["text"])
                elif event["type"] == "error":
                    raise protocol.internal(event["message"])
                else:
                    final = event
        finally:
            self.close()
        return "".join(parts), final
