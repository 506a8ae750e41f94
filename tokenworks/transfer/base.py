"""The KV transfer interface.

The prefill side runs a ``KVSource``: it exposes its KV pool and hears
releases. The decode side runs a ``KVSink``: given a peer's ``KVPeer`` card
and block ids, it READs those blocks into its own pool and then tells the
peer to release them. Both sides describe their pool with a ``KVLayout``;
a sink refuses a peer whose layout differs (model, dtype, layers, KV heads,
head size, block size) before moving a byte.

Blocks are contiguous regions of ``block_nbytes`` (all layers), so a
transfer is one descriptor per block.
"""

from __future__ import annotations

import abc
import queue

import msgspec


class KVLayout(msgspec.Struct, frozen=True):
    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    block_nbytes: int


class KVPeer(msgspec.Struct, frozen=True):
    """What a decode worker needs to read a prefill worker's blocks."""

    transport: str  # "tcp" or "nixl"
    worker_id: str
    layout: KVLayout
    endpoint: str = ""  # tcp: the source's ZMQ address
    agent_name: str = ""  # nixl
    agent_metadata: bytes = b""  # nixl
    base_address: int = 0  # nixl: address of block 0


class KVLayoutMismatch(ValueError):
    pass


class KVTransferError(RuntimeError):
    pass


def check_layout(local: KVLayout, remote: KVLayout) -> None:
    diffs = [
        f"{name}: local {getattr(local, name)!r} vs peer {getattr(remote, name)!r}"
        for name in KVLayout.__struct_fields__
        if getattr(local, name) != getattr(remote, name)
    ]
    if diffs:
        raise KVLayoutMismatch("KV layouts differ, refusing to transfer: " + "; ".join(diffs))


class KVSource(abc.ABC):
    """Prefill side: makes its pool readable and collects releases.

    Implementations hear releases on their own thread and hand them over
    through ``_releases``; the engine loop drains it with ``poll_releases``.
    """

    def __init__(self) -> None:
        self._releases: queue.SimpleQueue[str] = queue.SimpleQueue()

    @abc.abstractmethod
    def peer(self) -> KVPeer:
        """This source's card, handed to decode workers through the router."""

    def poll_releases(self) -> list[str]:
        """Request ids whose blocks a sink has finished reading (non-blocking)."""
        out = []
        while True:
            try:
                out.append(self._releases.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        pass


class KVSink(abc.ABC):
    """Decode side: reads blocks from sources into the local pool."""

    @abc.abstractmethod
    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float) -> int:
        """Copy the remote blocks into the local ones; return bytes moved. Raises on failure."""

    @abc.abstractmethod
    def release(self, peer: KVPeer, request_id: str) -> None:
        """Tell the source it may free the request's blocks."""

    def close(self) -> None:
        pass
