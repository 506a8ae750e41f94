"""The asynchronous streaming interface: add, abort, iterate new tokens per request.

One background thread owns the engine and runs its loop; asyncio callers
talk to it through a command queue and receive outputs on per-request
asyncio queues. Leaving the ``async for`` early (or being cancelled) aborts
the request, so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from tokenworks.config import EngineArgs
from tokenworks.outputs import RequestOutput
from tokenworks.sampling_params import SamplingParams


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue
    accepted: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, model: str | None = None, **options: Any) -> None:
        from tokenworks.llm import build_engine

        self.loaded = build_engine(EngineArgs(model=model, **options))
        self.engine = self.loaded.engine
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tokenworks-engine", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield one RequestOutput per new token; the last one has ``finished=True``."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error!r}")
        rid = request_id or f"async-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(rid, prompt, params, asyncio.get_running_loop(), stream, accepted))
        await asyncio.wrap_future(accepted)  # raises the engine's ValueError for bad input
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine stopped: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout=10)

    # -- engine thread -------------------------------------------------------------------

    def _handle(self, cmd: _Add | _Abort | None) -> None:
        if cmd is None:
            return
        if isinstance(cmd, _Abort):
            self._streams.pop(cmd.request_id, None)
            self.engine.abort(cmd.request_id)
            return
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except Exception as e:  # bad input: tell the caller, keep serving
            cmd.accepted.set_exception(e)
            return
        self._streams[cmd.request_id] = (cmd.loop, cmd.stream)
        cmd.accepted.set_result(True)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                block = not self.engine.has_unfinished()
                try:
                    self._handle(self._commands.get(block=block))
                    while True:
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self._stopping or not self.engine.has_unfinished():
                    continue
                for out in self.engine.step():
                    target = self._streams.get(out.request_id)
                    if target is not None:
                        loop, stream = target
                        loop.call_soon_threadsafe(stream.put_nowait, out)
                        if out.finished:
                            del self._streams[out.request_id]
        except BaseException as e:  # a bug in a step: fail every stream loudly, never hang them
            self.error = e
            for loop, stream in self._streams.values():
                loop.call_soon_threadsafe(stream.put_nowait, e)
            self._streams.clear()
            raise
