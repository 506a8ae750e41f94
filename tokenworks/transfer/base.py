"""The KV transfer interface.

The prefill side runs a ``KVSource``: it exposes its KV pool and hears
releases. The decode side runs a ``KVSink``: given a peer's ``KVPeer`` card
and block ids, it READs those blocks into its own pool and then tells the
peer to release them. Both sides describe their pool with a ``KVLayout``;
a sink refuses a peer whose layout differs (model, dtype, layers, KV heads,
head size, block size) before moving a byte.

Blocks are contiguous regions of ``block_nbytes`` (all layers), so a
transfer is one descriptor per block. Which path bytes take for each pair of
devices (host staging, CUDA IPC, NIXL) is in docs/serving.md.
"""

from __future__ import annotations

import abc
import functools
import queue
import socket
from typing import Callable

import msgspec


class KVLayout(msgspec.Struct, frozen=True):
    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    block_nbytes: int


class CudaIpcHandle(msgspec.Struct, frozen=True, array_like=True):
    """A CUDA KV pool exported for other processes on the same host (see transfer/cuda_ipc.py).

    The fields are what PyTorch's CUDA storage sharing hands out, all bytes and ints: no pickle."""

    device: int
    handle: bytes
    storage_nbytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int  # bytes from the storage's start to block 0
    num_blocks: int


class KVPeer(msgspec.Struct, frozen=True):
    """What a decode worker needs to read a prefill worker's blocks."""

    transport: str  # "tcp" or "nixl"
    worker_id: str
    layout: KVLayout
    endpoint: str = ""  # tcp: the source's ZMQ address
    agent_name: str = ""  # nixl
    agent_metadata: bytes = b""  # nixl
    base_address: int = 0  # nixl: address of block 0
    host: str = ""  # host_id() of the source's machine
    cuda_ipc: CudaIpcHandle | None = None  # set when the source's pool is on a CUDA device

    @property
    def card(self) -> str:
        """This source process's name among sources: a worker restarted under the same id has a new one (a new
        NIXL agent, a new random TCP port)."""
        return self.agent_name or self.endpoint or self.worker_id


def drain(q: queue.SimpleQueue) -> list:
    """Everything in ``q`` now, without waiting."""
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


@functools.cache
def host_id() -> str:
    """This machine's identity for 'same host?' checks: hostname and boot id (a reboot is another host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class KVLayoutMismatch(ValueError):
    cause = "layout"


class KVTransferError(RuntimeError):
    """A pull that did not complete; ``cause`` labels the failure metric."""

    cause = "error"


class KVTransferTimeout(KVTransferError):
    cause = "timeout"


class KVPeerGone(KVTransferError):
    """The source's connection was refused or closed: it is not coming back under this card."""

    cause = "peer_gone"


class KVTransferRefused(KVTransferError):
    """The source answered and said no (bad block ids, unsigned pull, ...)."""

    cause = "refused"


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

    def problem(self) -> str | None:
        """None while the source can serve pulls; else why not (its thread died, ...)."""
        return None

    def poll_releases(self) -> list[str]:
        """Request ids whose blocks a sink has finished reading (non-blocking)."""
        return drain(self._releases)

    def expect_pulls(self, expecting: bool) -> None:
        """The worker says whether it holds blocks that sinks may read (a source that polls can idle when not)."""

    def close(self) -> None:
        pass


class KVSink(abc.ABC):
    """Decode side: reads blocks from sources into the local pool."""

    @abc.abstractmethod
    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float, gone: Callable[[], bool] = lambda: False) -> int:
        """Copy the remote blocks into the local ones; return bytes moved. Raises on failure: ``KVPeerGone``
        where ``gone()`` turns true while the pull waits (the router declared the source dead)."""

    @abc.abstractmethod
    def release(self, peer: KVPeer, request_id: str) -> None:
        """Tell the source it may free the request's blocks."""

    def close(self) -> None:
        pass
