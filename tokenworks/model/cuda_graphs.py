"""Decode steps replayed as CUDA graphs: one launch for the whole forward pass.

An eager decode step on a GPU is bound by Python and kernel launches (about
ten per layer). ``DecodeGraphs`` captures the forward pass of a decode-only
step once per batch size bucket (1, 2, 4, 8, 16, then every 16 up to
``max_num_seqs``) over static input buffers, and replays the smallest bucket
that holds the step's rows. Rows beyond the step's own are padding: token 0
at position 0, writing its KV to slot 0 of block 0 (the pool's padding
target) and attending to that one slot, so they compute finite garbage that
nobody reads. Attention is ``paged_decode`` through each row's block table,
whose shape is fixed by the bucket and the longest context the engine
allows, so one graph serves every mix of context lengths.

Capture itself sits behind ``GraphCapture``: ``CudaGraphCapture`` on a GPU;
the CPU tests pass ``EagerCapture``, which replays by calling the same
function, so the buckets, the static buffers and the padding are tested
without a GPU.
"""

from __future__ import annotations

import time
from itertools import chain
from typing import Callable, Protocol

import numpy as np
import torch

from tokenworks.model.attention import AttentionMetadata
from tokenworks.model.kv_cache import KVCache
from tokenworks.model.llama import LlamaModel
from tokenworks.model.paged_decode import PagedDecode

# Rows of the host/device input block: token ids, positions, KV slot block, KV slot offset, context length.
IDS, POS, SLOT_BLOCK, SLOT_OFFSET, CTX = range(5)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, 16, then every 16, and max_num_seqs itself so every decode step fits."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (already run once); return what replays it."""


class CudaGraphCapture:
    """torch.cuda.CUDAGraph, all graphs in one memory pool (captured largest first, the smaller reuse it)."""

    def __init__(self) -> None:
        self.pool = None

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay


class EagerCapture:
    """The stand-in below the device boundary: a replay calls the function again."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: KVCache, max_num_seqs: int, max_blocks_per_seq: int,
                 capture: GraphCapture) -> None:
        self.model = model
        self.kv = kv
        self.sizes = capture_sizes(max_num_seqs)
        self.capturer = capture
        n = self.sizes[-1]
        dev = model.device
        pin = torch.device(dev).type == "cuda"
        # A step's inputs travel in one host-to-device copy of a contiguous staging area: the vectors (5, rows),
        # then the block tables (rows, width); two device copies put them into the static buffers the graphs read.
        # Two host areas, used in turn: while one step's copy may still wait behind the step before it
        # (overlapped scheduling), the next step fills the other.
        self.hosts = [torch.zeros(n * (5 + max_blocks_per_seq), dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        # Filled through numpy views of the same memory: from Python lists numpy is 3-4x cheaper than torch.tensor
        # (64 rows of ~40 block ids: 58 against 220 µs a step on the 2-core VM, benchmarks/host_step.py).
        self.host_views = [h.numpy() for h in self.hosts]
        self.columns = np.arange(max_blocks_per_seq)
        self.turn = 0
        self.staged = torch.zeros_like(self.hosts[0], device=dev)
        self.inputs = torch.zeros((5, n), dtype=torch.long, device=dev)
        self.inputs[CTX] = 1
        self.table = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays: dict[int, Callable[[], None]] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.table.shape[1]

    def bucket(self, rows: int) -> int | None:
        """The smallest captured size holding ``rows``; None beyond the largest (the step runs eagerly)."""
        return next((s for s in self.sizes if s >= rows), None)

    def _forward(self, size: int) -> Callable[[], None]:
        x = self.inputs
        meta = AttentionMetadata(slot_blocks=x[SLOT_BLOCK, :size], slot_offsets=x[SLOT_OFFSET, :size], decodes=[],
                                 prefills=[], paged=PagedDecode(self.table[:size], x[CTX, :size]))

        def run() -> None:
            self.outputs[size] = self.model.forward(x[IDS, :size], x[POS, :size], self.kv, meta)

        return run

    @torch.inference_mode()
    def capture_all(self) -> None:
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            run = self._forward(size)
            run()  # once outside the capture: kernels compiled, workspaces allocated
            self.replays[size] = self.capturer.capture(run)
        if torch.device(self.model.device).type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.capture_seconds = time.perf_counter() - t0

    def run(self, ids: list[int] | torch.Tensor, positions: list[int], slot_blocks: list[int], slot_offsets: list[int],
            tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """One decode step of len(ids) rows (at most ``max_batch``) -> their (rows, hidden) final hidden states.
        ``ids`` may be a device tensor (inputs sampled by the step before, not yet on the host)."""
        rows = len(ids)
        size = self.bucket(rows)
        if size is None:
            raise ValueError(f"{rows} rows exceed the largest captured batch {self.max_batch}")
        lens = [len(t) for t in tables]
        width = max(lens)
        if width > self.max_blocks_per_seq:
            raise ValueError(f"a row needs {width} blocks; graphs were captured for {self.max_blocks_per_seq}")
        on_device = isinstance(ids, torch.Tensor)
        host, view = self.hosts[self.turn], self.host_views[self.turn]
        self.turn ^= 1
        vec = view[: 5 * size].reshape(5, size)
        vec[:, rows:] = 0
        vec[CTX, rows:] = 1  # padding rows attend to their own slot
        vec[:, :rows] = [[0] * rows if on_device else ids, positions, slot_blocks, slot_offsets, context_lens]
        tab = view[5 * size : 5 * size + size * width].reshape(size, width)
        tab[:] = 0
        # Every row's block ids in one assignment: the mask selects each row's first len(row) columns, in row order.
        tab[:rows][self.columns[:width] < np.array(lens)[:, None]] = np.fromiter(
            chain.from_iterable(tables), dtype=np.int32, count=sum(lens))
        used = 5 * size + size * width
        self.staged[:used].copy_(host[:used], non_blocking=True)
        self.inputs[:, :size].copy_(self.staged[: 5 * size].view(5, size))
        if on_device:
            self.inputs[IDS, :rows].copy_(ids)
        # Columns past a row's context may keep stale block ids: the kernel never reads past the context.
        self.table[:size, :width].copy_(self.staged[5 * size : used].view(size, width))
        # This host area is filled again two steps on: by then this step's tokens were read back, so its copy is done.
        self.replays[size]()
        return self.outputs[size][:rows]
