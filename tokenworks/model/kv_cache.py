"""The paged KV pool: one preallocated tensor, one contiguous region per block.

Layout: ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)``.
A block holds K and V of ``block_size`` tokens for every layer in one run of
memory, so moving a request's KV to another process is one descriptor per
block (``block_region``). Block 0 is the padding target (see BlockPool).
"""

from __future__ import annotations

import torch

from tokenworks.config import CacheConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return model.num_layers * 2 * block_size * model.kv_size * torch.tensor([], dtype=dtype).element_size()


def num_blocks_for_budget(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    n = int(cache.kv_cache_memory_gib * 2**30) // bytes_per_block(model, cache.block_size, dtype)
    if n < 2:
        raise ValueError(f"kv_cache_memory_gib={cache.kv_cache_memory_gib} holds fewer than 2 blocks of this model")
    return n


class KVCache:
    def __init__(self, model: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype, device: str) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tensor = torch.zeros(
            (num_blocks, model.num_layers, 2, block_size, model.num_kv_heads, model.head_dim), dtype=dtype, device=device
        )
        # Per-layer views (num_blocks, block_size, kv_heads, head_dim); no copies.
        self.k = [self.tensor[:, layer, 0] for layer in range(model.num_layers)]
        self.v = [self.tensor[:, layer, 1] for layer in range(model.num_layers)]

    @property
    def block_nbytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def block_region(self, block_id: int) -> tuple[int, int]:
        """(address, length) of one block's bytes, all layers."""
        return self.tensor.data_ptr() + block_id * self.block_nbytes, self.block_nbytes
