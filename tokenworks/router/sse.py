"""A streamed HTTP response of server-sent events that can be written from outside its own task.

``EventStream`` is a Starlette response (so FastAPI passes it through as it is) whose events come two ways, and go
out in the order they are given:

- the events of ``body``, an async iterator, written by the response's own task, as Starlette's StreamingResponse
  does (a request's first token, its last, the usage chunk, an in-band error);
- ``write(event)``, a plain call from any code on the event loop: the router's reader, for the tokens of steady
  decoding (router/stream.py), so that a token reaches the socket in the reader's turn with no task switch.

ASGI's ``send`` is a coroutine function. ``write`` runs it at once up to its first suspension, which for a server
with room in its write buffer (uvicorn: the transport is not paused) is its end. When the server applies
back-pressure the send suspends: the rest of it then runs in a task, and later events wait behind it, so a slow
client costs memory for its own backlog only, never a blocked loop. A client that disconnects cancels the body's
iteration (whose clean-up aborts the request on its workers), as StreamingResponse does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, AsyncIterator, Mapping

from starlette.responses import Response


class _Resumed:
    """Await the rest of a coroutine that was started by hand and suspended on ``waiting_on``."""

    def __init__(self, coro, waiting_on: Any) -> None:
        self.coro, self.waiting_on = coro, waiting_on

    def __await__(self):
        coro, value = self.coro, self.waiting_on
        while True:
            try:
                sent = yield value
            except BaseException as e:  # noqa: BLE001 - passed into the coroutine, as `await` would
                try:
                    value = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


# Where an app may keep the server's own send in the scope, for the body's events to bypass middleware that wraps
# ``send`` only to see the response start (Starlette's error and exception middleware). Optional.
RAW_SEND = "tokenworks.raw_send"


def _body(event: bytes) -> dict:
    return {"type": "http.response.body", "body": event, "more_body": True}


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._send = None  # the ASGI send, once the response has started
        self._backlog: deque[bytes] = deque()  # events waiting behind a suspended send
        self._draining: asyncio.Task | None = None  # finishes a suspended send, then the backlog
        self._streaming: asyncio.Task | None = None
        self.error: BaseException | None = None  # a send that raised

    def write(self, event: bytes) -> None:
        """Put ``event`` on the wire now, or behind the events still waiting. Never raises, never blocks."""
        if self._send is None or self._draining is not None:
            self._backlog.append(event)
            return
        coro = self._send(_body(event))
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - ends the response (below); the caller goes on
            self._fail(e)
            return
        self._draining = asyncio.ensure_future(self._drain(coro, waiting_on))

    async def _drain(self, coro=None, waiting_on: Any = None) -> None:
        try:
            if coro is not None:
                await _Resumed(coro, waiting_on)
            while self._backlog:
                await self._send(_body(self._backlog.popleft()))
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        finally:
            self._draining = None

    def _fail(self, e: BaseException) -> None:
        self.error = e
        if self._streaming is not None:
            self._streaming.cancel()

    async def _flushed(self) -> None:
        """Wait until every event written so far is with the server (back-pressure for the body's events)."""
        while self._draining is not None:
            await asyncio.shield(self._draining)

    async def _stream(self) -> None:
        if self._backlog:  # written before the response started
            self._draining = asyncio.ensure_future(self._drain())
        async for event in self.body_iterator:
            self.write(event)
            await self._flushed()
        await self._flushed()

    @staticmethod
    async def _disconnected(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        send = self._send = scope.get(RAW_SEND, send)
        self._streaming = streaming = asyncio.ensure_future(self._stream())
        watching = asyncio.ensure_future(self._disconnected(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, watching, self._draining):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
        if self.error is not None:
            raise self.error
        if streaming.cancelled():
            return  # the client left: nothing more to send
        streaming.result()  # an error of the body's own
        await send({"type": "http.response.body", "body": b"", "more_body": False})
