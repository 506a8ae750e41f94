"""A request's stream at the router: what its workers send for it, on the way to the client.

The router's reader (router.py) puts each worker output for the request here. Most outputs wake the request's
task, which runs the request's control flow (``Router._attempt``: the first token, the hand-over from prefill to
decode, failover, the end). Once the request decodes steadily, that task opens a *lane*: a plain function that
takes an output, turns it into the client's next event and writes it, called in the reader's own turn of the event
loop, so a token costs no task switch (on this 2-core VM a switch per token was about a quarter of the router's
CPU per token). The lane gives back what it does not take (an output that ends the request or carries KV transfer
news, a failure, a stop string found in the text) and that goes to the task, in order: while the task has anything
queued, or is busy with an item, the lane stays shut.

A lane holds what it takes until the reader's turn is over (``Router._hold``): when the router keeps up with its
workers that is one step, and when it falls behind, a turn reads several steps of each stream, which then go out
as one event, so the cost of a token falls as the load rises.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable

# A lane takes a message and returns None when it delivered it, else what the request's task must see instead.
Lane = Callable[[Any], Any]


class RequestStream:
    __slots__ = ("_inbox", "_waiter", "_lane")

    def __init__(self) -> None:
        self._inbox: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._lane: Lane | None = None

    def put(self, msg: Any) -> None:
        """From the reader (or the watchdog). Never raises: a lane's error becomes the request's error."""
        lane = self._lane
        if lane is not None and not self._inbox:
            try:
                msg = lane(msg)
            except Exception as e:  # noqa: BLE001 - the request's task raises it; the reader goes on
                self._lane = None
                msg = e
            if msg is None:
                return
        self._inbox.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        """The next message for the request's task; the lane is shut until the task opens it again."""
        while not self._inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._lane = None
        return self._inbox.popleft()

    def open_lane(self, lane: Lane) -> None:
        """Let ``lane`` take the messages that come while the task waits in ``get``."""
        self._lane = lane
