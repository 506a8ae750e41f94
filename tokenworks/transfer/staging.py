"""Getting a request's KV blocks out of a pool as bytes, and back in: one implementation per kind of pool.

A pull moves the blocks of one request. On the wire they are the blocks'
bytes in the order asked for, in one or more frames (a receiver takes any
split). ``HostBlocks`` (a pool in CPU memory) sends one zero-copy frame per
block and copies each arriving block into place. ``DeviceBlocks`` (a pool on
a CUDA device) gathers the blocks on the device into one buffer, copies it
once to pinned host memory and sends that; the receiver copies the bytes into
one pinned buffer, moves it to the device in one copy and scatters it into its
blocks: one copy each way per request, not one per block. Device work runs on
the stager's own stream, so the engine's stream is never waited on.

``copy_blocks`` moves blocks between two device pools without the host (the
CUDA IPC path): one copy per contiguous run of block ids, or one gather and
one scatter when the ids are scattered.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

MAX_RUNS = 8  # above this many contiguous runs, copy_blocks gathers and scatters instead


def block_view(kv_tensor: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_nbytes) uint8 view of a pool laid out block-major."""
    return kv_tensor.view(torch.uint8).view(kv_tensor.shape[0], -1)


def valid_block_ids(block_ids: Sequence[int], num_blocks: int) -> bool:
    """Every id names a real block of a pool of ``num_blocks`` (block 0 is the padding target, never moved)."""
    return all(0 < b < num_blocks for b in block_ids)


def runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of the runs where both id lists count up by one together."""
    out: list[tuple[int, int, int]] = []
    s0 = d0 = n = 0
    for s, d in zip(src_ids, dst_ids):
        if n and s == s0 + n and d == d0 + n:
            n += 1
            continue
        if n:
            out.append((s0, d0, n))
        s0, d0, n = s, d, 1
    if n:
        out.append((s0, d0, n))
    return out


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for block views (num_blocks, block_nbytes), on the current stream."""
    pieces = runs(src_ids, dst_ids)
    if len(pieces) <= MAX_RUNS:
        for s, d, n in pieces:
            dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
        return
    src, dst = _wide(src), _wide(dst)  # index kernels move one element per thread: make elements wide
    s_idx = torch.tensor(list(src_ids), dtype=torch.long).to(src.device, non_blocking=True)
    d_idx = torch.tensor(list(dst_ids), dtype=torch.long).to(dst.device, non_blocking=True)
    dst.index_copy_(0, d_idx, src.index_select(0, s_idx).to(dst.device, non_blocking=True))


def _wide(blocks: torch.Tensor) -> torch.Tensor:
    """The same (num_blocks, block_nbytes) bytes viewed as the widest integer type that divides a block."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if blocks.shape[1] % size == 0 and blocks.data_ptr() % size == 0:
            return blocks.view(dtype)
    return blocks


def _check_frames(frames: Sequence[memoryview], n: int, nbytes: int) -> None:
    got = sum(memoryview(f).nbytes for f in frames)
    if got != n * nbytes:
        raise ValueError(f"expected {n} blocks of {nbytes} bytes ({n * nbytes} bytes), got {got} bytes")


class BlockIO(abc.ABC):
    """Reads blocks of one pool out as bytes and writes bytes into its blocks. Thread-safe per call."""

    def __init__(self, kv_tensor: torch.Tensor) -> None:
        self.blocks = block_view(kv_tensor)
        self.block_nbytes = self.blocks.shape[1]

    @abc.abstractmethod
    def read(self, block_ids: Sequence[int]) -> list[memoryview]:
        """The blocks' bytes in order, as frames that stay valid while referenced."""

    @abc.abstractmethod
    def write(self, frames: Sequence[memoryview], block_ids: Sequence[int]) -> None:
        """Put the bytes of ``len(block_ids)`` blocks (split over frames any way) into those blocks; returns
        once they are in place."""


class HostBlocks(BlockIO):
    def read(self, block_ids: Sequence[int]) -> list[memoryview]:
        return [memoryview(self.blocks[b].numpy()) for b in block_ids]

    def write(self, frames: Sequence[memoryview], block_ids: Sequence[int]) -> None:
        _check_frames(frames, len(block_ids), self.block_nbytes)
        if len(frames) == len(block_ids) and all(memoryview(f).nbytes == self.block_nbytes for f in frames):
            for f, b in zip(frames, block_ids):
                self.blocks[b].copy_(torch.frombuffer(f, dtype=torch.uint8))
            return
        staged = torch.cat([torch.frombuffer(f, dtype=torch.uint8) for f in frames]).view(len(block_ids), -1)
        self.blocks.index_copy_(0, torch.tensor(list(block_ids), dtype=torch.long), staged)


class DeviceBlocks(BlockIO):
    def __init__(self, kv_tensor: torch.Tensor) -> None:
        super().__init__(kv_tensor)
        self.device = kv_tensor.device
        self.stream = torch.cuda.Stream(self.device)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)

    def read(self, block_ids: Sequence[int]) -> list[memoryview]:
        host = torch.empty((len(block_ids), self.block_nbytes), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self.stream):
            host.copy_(self.blocks.index_select(0, self._index(block_ids)), non_blocking=True)
        self.stream.synchronize()
        return [memoryview(host.numpy()).cast("B")]

    def write(self, frames: Sequence[memoryview], block_ids: Sequence[int]) -> None:
        _check_frames(frames, len(block_ids), self.block_nbytes)
        host = torch.empty(len(block_ids) * self.block_nbytes, dtype=torch.uint8, pin_memory=True)
        at = 0
        for f in frames:
            part = torch.frombuffer(f, dtype=torch.uint8)
            host[at : at + part.numel()].copy_(part)
            at += part.numel()
        # As in CudaIpcSink.pull: after whatever the engine's stream holds, which may still write a freed block.
        self.stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.stream):
            staged = host.view(len(block_ids), -1).to(self.device, non_blocking=True)
            self.blocks.index_copy_(0, self._index(block_ids), staged)
        self.stream.synchronize()


def block_io(kv_tensor: torch.Tensor) -> BlockIO:
    """The BlockIO for this pool's device."""
    return DeviceBlocks(kv_tensor) if kv_tensor.device.type == "cuda" else HostBlocks(kv_tensor)
