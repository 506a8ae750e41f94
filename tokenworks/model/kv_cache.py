"""The paged KV pool: one preallocated tensor, one contiguous region per block.

Layout: ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)``.
A block holds K and V of ``block_size`` tokens for every layer in one run of
memory, so moving a request's KV to another process is one descriptor per
block (``block_nbytes`` bytes, ``block_id x block_nbytes`` into the tensor).
Block 0 is the padding target (see BlockPool).

An ``int8`` pool (CPU) holds each token's head as ``head_dim`` signed bytes
and then its scale, a float32 in the row's last 4 bytes: a head row is
``head_dim + 4`` bytes (``head_width``), x = scale * q with scale =
max |x| / 127 (``store_rows``, ``widen``; the native step writes and reads
the same bytes). Everything that moves blocks as bytes (transfers, the host
tier) is unchanged.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from tokenworks.config import CacheConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
SCALE_BYTES = 4  # an int8 pool's float32 scale after each head row's values


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def head_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of a pool's head row: its values, and on an int8 pool the scale's bytes after them."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def store_rows(cache: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, x: torch.Tensor) -> None:
    """x (T, H_kv, D) written to the slots of ``cache`` (num_blocks, block_size, H_kv, head_width): rounded to the
    pool's dtype (to nearest), or on an int8 pool quantized per head row, q = round(x / scale) with scale =
    max |x| / 127 in float32 (q = 0 where the row is all zeros)."""
    if cache.dtype != torch.int8:
        cache[slot_blocks, slot_offsets] = x.to(cache.dtype)
        return
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127).to(torch.int8)
    cache[slot_blocks, slot_offsets] = torch.cat([q, scale.view(torch.int8)], -1)


def widen(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows (..., head_width) -> their values (..., head_dim) in ``dtype``."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    q, scale = rows.split([rows.shape[-1] - SCALE_BYTES, SCALE_BYTES], -1)
    return (q.float() * scale.contiguous().view(torch.float32)).to(dtype)


def kv_dtype(cache: CacheConfig, model_dtype: torch.dtype, device: str) -> torch.dtype:
    """The pool's dtype. ``auto``: float16 where the model computes in float32 on the CPU (half the memory per
    token and half the bytes a decode step reads, for a perplexity within 0.1 %: docs/engine.md), else the
    model's. A pool narrower than the model is written by rounding to nearest and widened as it is read
    (attention computes in the model's dtype); on CUDA only the model's dtype (EngineArgs checks)."""
    if cache.dtype != "auto":
        return _DTYPES[cache.dtype]
    return torch.float16 if model_dtype == torch.float32 and torch.device(device).type == "cpu" else model_dtype


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return (model.num_layers * 2 * block_size * model.num_kv_heads * head_width(model.head_dim, dtype)
            * dtype.itemsize)


def default_kv_bytes(model: ModelConfig, dtype: torch.dtype, device: str) -> int:
    """The KV pool when none is asked for. CPU: two of the model's full contexts, at most 1/16 of the machine's
    memory (SmolLM2-135M, 8k context, float32: 0.70 GiB); CUDA: 1 GiB (GPU runs size it with
    --kv-cache-memory-gib)."""
    if torch.device(device).type != "cpu":
        return 2**30
    want = 2 * model.max_position * bytes_per_block(model, 1, dtype)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return max(64 * 2**20, min(want, ram // 16))


def num_blocks_for_budget(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: str = "cpu") -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = default_kv_bytes(model, dtype, device) if cache.kv_cache_memory_gib is None \
        else int(cache.kv_cache_memory_gib * 2**30)
    n = budget // bytes_per_block(model, cache.block_size, dtype)
    if n < 2:
        raise ValueError(f"kv_cache_memory_gib={cache.kv_cache_memory_gib} holds fewer than 2 blocks of this model")
    return n


class KVCache:
    def __init__(self, model: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype, device: str) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, model.num_layers, 2, block_size, model.num_kv_heads, head_width(model.head_dim, dtype))
        if torch.device(device).type == "cpu":
            # Zeroed pages the kernel hands out untouched (calloc): a block's memory becomes resident when first
            # written, not at start, so an idle or lightly used worker does not hold its whole pool.
            nbytes = math.prod(shape) * dtype.itemsize
            self.tensor = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views (num_blocks, block_size, kv_heads, head_width); no copies.
        self.k = [self.tensor[:, layer, 0] for layer in range(model.num_layers)]
        self.v = [self.tensor[:, layer, 1] for layer in range(model.num_layers)]

    @property
    def block_nbytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    @property
    def dtype_name(self) -> str:
        """The pool's dtype as the CLI and the transfer layout spell it ("float16")."""
        return str(self.tensor.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
