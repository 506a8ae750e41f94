"""The decode side's KV pulls: several at a time off the engine loop, each finishing on its own.

Each pull thread owns its sink (sockets are not shared between threads), so a
slow or failing pull of one request does not hold up another's. The bytes in
flight are bounded: a pull waits for room unless nothing else is in flight
(one request larger than the bound still goes, alone). A thread that dies is
reported by ``problem()``; the worker then reports itself unhealthy.

A source the router has declared dead (``peer_gone``: its process exited, or
it sent no heartbeat for the router's timeout) fails at once, as ``peer_gone``,
the pulls from it submitted before the notice, waiting or queued: a source
that hangs (stopped, not dead) costs the heartbeat timeout, not
``--kv-timeout``. Pulls submitted after the notice go ahead (a source that
was only paused comes back under the same card).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tokenworks.engine.request import Request
from tokenworks.transfer.base import KVPeer, KVPeerGone, KVSink, drain

NUM_PULL_THREADS = 4
MAX_INFLIGHT_BYTES = 1 << 30


@dataclass
class PullJob:
    request: Request
    peer: KVPeer
    remote_block_ids: list[int]
    local_block_ids: list[int]
    started: float  # when the decode submit came (time.monotonic()), before any wait for KV room
    ok: bool = False
    nbytes: int = 0
    error: str = ""
    cause: str = ""  # failure metric label: timeout, peer_gone, refused, layout, error


class PullPool:
    def __init__(self, make_sink: Callable[[], KVSink], timeout: float, block_nbytes: int,
                 num_threads: int = NUM_PULL_THREADS, max_inflight_bytes: int = MAX_INFLIGHT_BYTES) -> None:
        self.timeout = timeout
        self.block_nbytes = block_nbytes
        self.max_inflight_bytes = max_inflight_bytes
        self._todo: queue.SimpleQueue[PullJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[PullJob] = queue.SimpleQueue()
        self._room = threading.Condition()
        self.inflight_bytes = 0
        self._problem: str | None = None
        self._closing = False
        self._gone: dict[str, float] = {}  # card (KVPeer.card) -> when its source was last declared dead
        self._threads = [threading.Thread(target=self._run, args=(make_sink(),), name=f"kv-pull-{i}", daemon=True)
                         for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def submit(self, job: PullJob) -> None:
        self._todo.put(job)

    def peer_gone(self, card: str) -> None:
        """The router declared the source with this card dead: the pulls from it submitted until now fail now,
        not at their timeout."""
        self._gone[card] = time.monotonic()

    def finished(self) -> list[PullJob]:
        """Pulls done since the last call, successful or not (non-blocking)."""
        return drain(self._done)

    def problem(self) -> str | None:
        if self._problem is None and not self._closing and not all(t.is_alive() for t in self._threads):
            return "a KV pull thread is gone"
        return self._problem

    def _take_room(self, n: int) -> None:
        with self._room:
            while self.inflight_bytes and self.inflight_bytes + n > self.max_inflight_bytes:
                self._room.wait()
            self.inflight_bytes += n

    def _give_room(self, n: int) -> None:
        with self._room:
            self.inflight_bytes -= n
            self._room.notify_all()

    def _run(self, sink: KVSink) -> None:
        try:
            while (job := self._todo.get()) is not None:
                self._pull(sink, job)
                self._done.put(job)
        except BaseException as e:  # noqa: BLE001 - reported through problem()
            self._problem = f"a KV pull thread died: {type(e).__name__}: {e}"
        finally:
            sink.close()

    def _pull(self, sink: KVSink, job: PullJob) -> None:
        n = len(job.local_block_ids) * self.block_nbytes
        self._take_room(n)
        card, gone, started = job.peer.card, self._gone, job.started

        def declared_dead() -> bool:
            return gone.get(card, -1.0) >= started

        try:
            if declared_dead():
                raise KVPeerGone(f"KV source {job.peer.worker_id} is gone (declared dead by the router)")
            job.nbytes = sink.pull(job.peer, job.request.request_id, job.remote_block_ids, job.local_block_ids,
                                   self.timeout, declared_dead)
            job.ok = True
        except Exception as e:  # noqa: BLE001 - any failure falls back to recompute
            job.error = f"{type(e).__name__}: {e}"
            job.cause = getattr(e, "cause", "error")
        finally:
            self._give_room(n)
        try:
            sink.release(job.peer, job.request.request_id)
        except Exception:  # noqa: BLE001 - the source's lease frees the blocks anyway
            pass

    def close(self) -> None:
        self._closing = True
        for _ in self._threads:
            self._todo.put(None)
        deadline = time.monotonic() + 2
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
