"""Same-host GPU to GPU: the sink maps the source's CUDA KV pool and copies blocks on the device.

The source exports its pool once (``export``: PyTorch's CUDA storage
sharing, i.e. a cudaIpcMemHandle plus the offsets and the event that go with
it) and puts the handle on its ``KVPeer`` card. A decode worker whose pool is
on a CUDA device wraps its network sink in ``CudaIpcSink``: for a card from
the same host (``host_id``) that carries a handle, it opens the pool once
(cached per handle; a restarted source brings a new handle and the old
mapping is dropped) and copies the requested blocks device to device on its
own stream; for any other card it hands the pull to the network sink.
Releases always go over the network sink's control channel.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from tokenworks.transfer.base import (CudaIpcHandle, KVLayout, KVPeer, KVSink, KVTransferRefused, check_layout,
                                      host_id)
from tokenworks.transfer.staging import block_view, copy_blocks, valid_block_ids


def export(kv_tensor: torch.Tensor) -> CudaIpcHandle:
    """The handle another process on this host opens to read ``kv_tensor`` (a CUDA tensor)."""
    (device, handle, storage_nbytes, storage_offset, ref_handle, ref_offset, event_handle,
     event_sync) = kv_tensor.untyped_storage()._share_cuda_()
    return CudaIpcHandle(
        device=int(device), handle=bytes(handle), storage_nbytes=int(storage_nbytes),
        storage_offset=int(storage_offset), ref_counter_handle=bytes(ref_handle), ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle), event_sync_required=bool(event_sync),
        tensor_offset=kv_tensor.storage_offset() * kv_tensor.element_size(), num_blocks=kv_tensor.shape[0],
    )


def open_blocks(h: CudaIpcHandle) -> torch.Tensor:
    """The exported pool as a (num_blocks, block_nbytes) uint8 tensor in this process."""
    storage = torch.UntypedStorage._new_shared_cuda(
        h.device, h.handle, h.storage_nbytes, h.storage_offset, h.ref_counter_handle, h.ref_counter_offset,
        h.event_handle, h.event_sync_required)
    flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{h.device}").set_(storage)
    pool = flat[h.tensor_offset:]
    return pool[: (pool.numel() // h.num_blocks) * h.num_blocks].view(h.num_blocks, -1)


class OpenedPools:
    """Remote pools opened in this process, one per source worker, shared by the pull threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, tuple[bytes, torch.Tensor]] = {}  # worker id -> (handle, block view)

    def get(self, worker_id: str, h: CudaIpcHandle) -> torch.Tensor:
        with self._lock:
            known = self._pools.get(worker_id)
            if known is None or known[0] != h.handle:
                self._pools[worker_id] = (h.handle, open_blocks(h))  # replaces a restarted source's old mapping
            return self._pools[worker_id][1]


def same_host_gpu(peer: KVPeer) -> bool:
    return peer.cuda_ipc is not None and peer.host == host_id()


class CudaIpcSink(KVSink):
    """Device-to-device pulls from same-host CUDA sources; everything else through ``network``."""

    def __init__(self, network: KVSink, layout: KVLayout, kv_tensor: torch.Tensor, opened: OpenedPools) -> None:
        self.network = network
        self.layout = layout
        self.blocks = block_view(kv_tensor)
        self.opened = opened
        self.stream = torch.cuda.Stream(kv_tensor.device)

    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float, gone: Callable[[], bool] = lambda: False) -> int:
        if not same_host_gpu(peer):
            return self.network.pull(peer, request_id, remote_block_ids, local_block_ids, timeout, gone)
        check_layout(self.layout, peer.layout)
        if not remote_block_ids:
            return 0
        remote = self.opened.get(peer.worker_id, peer.cuda_ipc)
        if not valid_block_ids(remote_block_ids, remote.shape[0]):
            raise KVTransferRefused(f"KV pull from {peer.worker_id}: block id out of range")
        # The local blocks may have been freed by a request whose last step is still queued on the engine's stream
        # (overlapped scheduling computes one more token for a request that stopped) and would write one slot.
        self.stream.wait_stream(torch.cuda.default_stream(self.blocks.device))
        with torch.cuda.stream(self.stream):
            copy_blocks(remote, self.blocks, remote_block_ids, local_block_ids)
        self.stream.synchronize()
        return len(local_block_ids) * self.layout.block_nbytes

    def release(self, peer: KVPeer, request_id: str) -> None:
        self.network.release(peer, request_id)

    def close(self) -> None:
        self.network.close()
