"""KV transfer over ZMQ/TCP: the portable fallback when NIXL is not available.

The source runs a thread with a ROUTER socket. A sink sends
``PullRequest(layout, request_id, block_ids)`` and receives one frame per
block, sent zero-copy from the pool's memory; ``Release(request_id)`` lets
the source free the blocks. Messages are msgspec; block frames are raw bytes.
"""

from __future__ import annotations

import threading

import msgspec
import torch
import zmq

from tokenworks.codec import Codec
from tokenworks.transfer.base import KVLayout, KVPeer, KVSink, KVSource, KVTransferError, check_layout


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


def _block_view(kv_tensor: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_nbytes) uint8 view of the pool."""
    return kv_tensor.view(torch.uint8).view(kv_tensor.shape[0], -1)


class TCPSource(KVSource):
    def __init__(self, worker_id: str, layout: KVLayout, kv_tensor: torch.Tensor, host: str = "127.0.0.1",
                 secret: bytes | None = None) -> None:
        super().__init__()
        self.codec = Codec(PullRequest | Release, secret)
        self.worker_id = worker_id
        self.layout = layout
        self.blocks = _block_view(kv_tensor)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-tcp-source", daemon=True)
        self._thread.start()

    def peer(self) -> KVPeer:
        return KVPeer(transport="tcp", worker_id=self.worker_id, layout=self.layout, endpoint=self.endpoint)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            ident, _, payload = self._sock.recv_multipart()
            try:
                msg = self.codec.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                self._sock.send_multipart([ident, b"", _reply.encode(PullReply(False, f"bad message: {e}"))])
                continue
            if isinstance(msg, Release):
                self._releases.put(msg.request_id)
                continue
            if msg.layout != self.layout:
                self._sock.send_multipart([ident, b"", _reply.encode(PullReply(False, "KV layout mismatch"))])
                continue
            if any(not (0 < b < self.blocks.shape[0]) for b in msg.block_ids):
                self._sock.send_multipart([ident, b"", _reply.encode(PullReply(False, "block id out of range"))])
                continue
            frames = [ident, b"", _reply.encode(PullReply(True))]
            frames += [memoryview(self.blocks[b].numpy()) for b in msg.block_ids]
            self._sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(0)


class TCPSink(KVSink):
    """Used from one thread (the decode worker's transfer thread)."""

    def __init__(self, layout: KVLayout, kv_tensor: torch.Tensor, secret: bytes | None = None) -> None:
        self.layout = layout
        self.codec = Codec(PullRequest | Release, secret)
        self.blocks = _block_view(kv_tensor)
        self._ctx = zmq.Context.instance()
        self._socks: dict[str, zmq.Socket] = {}

    def _sock(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._socks[endpoint] = sock
        return sock

    def _drop(self, endpoint: str) -> None:
        sock = self._socks.pop(endpoint, None)
        if sock is not None:
            sock.close(0)

    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float) -> int:
        check_layout(self.layout, peer.layout)
        if not remote_block_ids:
            return 0
        sock = self._sock(peer.endpoint)
        sock.send_multipart([b"", self.codec.encode(PullRequest(self.layout, request_id, remote_block_ids))])
        if not sock.poll(int(timeout * 1000)):
            self._drop(peer.endpoint)  # a late reply must not be read as the next pull's
            raise KVTransferError(f"KV pull from {peer.worker_id} timed out after {timeout:.1f}s")
        frames = sock.recv_multipart(copy=False)
        reply = msgspec.msgpack.decode(frames[1].bytes, type=PullReply)
        if not reply.ok:
            raise KVTransferError(f"KV pull from {peer.worker_id} refused: {reply.error}")
        if len(frames) - 2 != len(local_block_ids):
            raise KVTransferError("KV pull returned the wrong number of blocks")
        moved = 0
        for frame, b in zip(frames[2:], local_block_ids):
            src = torch.frombuffer(frame.buffer, dtype=torch.uint8)
            self.blocks[b].copy_(src)
            moved += src.numel()
        return moved

    def release(self, peer: KVPeer, request_id: str) -> None:
        self._sock(peer.endpoint).send_multipart([b"", self.codec.encode(Release(request_id))])

    def close(self) -> None:
        for endpoint in list(self._socks):
            self._drop(endpoint)
