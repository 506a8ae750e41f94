"""KV transfer over ZMQ/TCP: the portable path, and the one for pools on different hosts.

The source runs a thread with a ROUTER socket. A sink sends
``PullRequest(layout, request_id, block_ids)`` and receives the blocks' bytes
(see transfer/staging.py for how each kind of pool reads and writes them);
``Release(request_id)`` lets the source free the blocks. Messages are msgspec;
block frames are raw bytes.

Failures are told apart: a refused pull (bad ids, unsigned) is answered at
once; a source that is gone (connection refused or closed, seen on the
socket's monitor) fails the pull within a poll interval; only a source that
is connected but silent waits out the timeout. A source whose thread dies
closes its socket, so its peers see it gone at once, and reports a problem.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from tokenworks.codec import Codec
from tokenworks.transfer.base import (KVLayout, KVPeer, KVPeerGone, KVSink, KVSource, KVTransferError,
                                      KVTransferRefused, KVTransferTimeout, check_layout)
from tokenworks.transfer.staging import block_io, valid_block_ids


class PullRequest(msgspec.Struct, tag="pull"):
    layout: KVLayout
    request_id: str
    block_ids: list[int]


class Release(msgspec.Struct, tag="release"):
    request_id: str


class PullReply(msgspec.Struct):
    ok: bool
    error: str = ""


_reply = msgspec.msgpack.Encoder()
POLL_SLICE = 0.05  # seconds between checks of the connection's state while a pull waits


class TCPSource(KVSource):
    def __init__(self, worker_id: str, layout: KVLayout, kv_tensor: torch.Tensor, host: str = "127.0.0.1",
                 secret: bytes | None = None) -> None:
        super().__init__()
        self.codec = Codec(PullRequest | Release, secret)
        self.worker_id = worker_id
        self.layout = layout
        self.io = block_io(kv_tensor)
        self.num_blocks = kv_tensor.shape[0]
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-tcp-source", daemon=True)
        self._thread.start()

    def peer(self) -> KVPeer:
        return KVPeer(transport="tcp", worker_id=self.worker_id, layout=self.layout, endpoint=self.endpoint)

    def problem(self) -> str | None:
        if self._problem is None and not self._thread.is_alive() and not self._stop.is_set():
            return "the KV source thread is gone"
        return self._problem

    def _serve(self) -> None:
        try:
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = self._answer(self._sock.recv_multipart())
                if frames:
                    self._sock.send_multipart(frames, copy=False)
        except BaseException as e:  # noqa: BLE001 - reported through problem(); the worker restarts
            self._problem = f"the KV source thread died: {type(e).__name__}: {e}"
        finally:
            self._sock.close(0)  # peers see the connection close and stop waiting on it

    def _answer(self, received: list[bytes]) -> list:
        """The frames to send back for one message (an empty list: nothing to send)."""
        ident = received[0]

        def refuse(error: str) -> list:
            return [ident, b"", _reply.encode(PullReply(False, error))]

        if len(received) != 3:
            return refuse("bad message: expected one payload frame")
        try:
            msg = self.codec.decode(received[2])
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            return refuse(f"bad message: {e}")
        if isinstance(msg, Release):
            self._releases.put(msg.request_id)
            return []
        if msg.layout != self.layout:
            return refuse("KV layout mismatch")
        if not valid_block_ids(msg.block_ids, self.num_blocks):
            return refuse("block id out of range")
        try:
            frames = self.io.read(msg.block_ids)
        except Exception as e:  # noqa: BLE001 - one bad read is this pull's failure, not the thread's
            return refuse(f"reading blocks failed: {type(e).__name__}: {e}")
        return [ident, b"", _reply.encode(PullReply(True)), *frames]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class _Connection:
    """A DEALER socket to one source and a monitor of its TCP connection."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED)
        self.sock.connect(endpoint)
        self.connected = False
        self.gone = ""  # why the source is known to be unreachable

    def check(self) -> str:
        """Read the connection's events; returns why the source is gone, or ""."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected, self.gone = True, ""
            elif event == zmq.EVENT_DISCONNECTED:
                self.gone = "connection closed by the source"
            elif event == zmq.EVENT_CONNECT_RETRIED:  # also follows a close: keep the first reason
                self.gone = self.gone or "connection refused"
        return self.gone

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


class TCPSink(KVSink):
    """Used from one thread (each pull thread of a decode worker has its own sink)."""

    def __init__(self, layout: KVLayout, kv_tensor: torch.Tensor, secret: bytes | None = None) -> None:
        self.layout = layout
        self.codec = Codec(PullRequest | Release, secret)
        self.io = block_io(kv_tensor)
        self._ctx = zmq.Context.instance()
        self._conns: dict[str, _Connection] = {}

    def _conn(self, endpoint: str) -> _Connection:
        conn = self._conns.get(endpoint)
        if conn is None:
            conn = self._conns[endpoint] = _Connection(self._ctx, endpoint)
        return conn

    def _drop(self, endpoint: str) -> None:
        conn = self._conns.pop(endpoint, None)
        if conn is not None:
            conn.close()

    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float, gone: Callable[[], bool] = lambda: False) -> int:
        check_layout(self.layout, peer.layout)
        if not remote_block_ids:
            return 0
        conn = self._conn(peer.endpoint)
        conn.sock.send_multipart([b"", self.codec.encode(PullRequest(self.layout, request_id, remote_block_ids))])
        deadline = time.monotonic() + timeout
        while not conn.sock.poll(int(POLL_SLICE * 1000)):
            why = conn.check() or ("declared dead by the router" if gone() else "")
            if why:
                self._drop(peer.endpoint)  # a late reply must not be read as the next pull's
                raise KVPeerGone(f"KV source {peer.worker_id} is gone ({why})")
            if time.monotonic() > deadline:
                self._drop(peer.endpoint)  # a late reply must not be read as the next pull's
                raise KVTransferTimeout(f"KV pull from {peer.worker_id} timed out after {timeout:.1f}s")
        frames = conn.sock.recv_multipart(copy=False)
        reply = msgspec.msgpack.decode(frames[1].bytes, type=PullReply)
        if not reply.ok:
            raise KVTransferRefused(f"KV pull from {peer.worker_id} refused: {reply.error}")
        try:
            self.io.write([f.buffer for f in frames[2:]], local_block_ids)
        except ValueError as e:
            raise KVTransferError(f"KV pull from {peer.worker_id}: {e}") from e
        return len(local_block_ids) * self.layout.block_nbytes

    def release(self, peer: KVPeer, request_id: str) -> None:
        self._conn(peer.endpoint).sock.send_multipart([b"", self.codec.encode(Release(request_id))])

    def close(self) -> None:
        for endpoint in list(self._conns):
            self._drop(endpoint)
