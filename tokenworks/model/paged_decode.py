"""Decode attention through each request's block table, in one call for the whole batch.

``PagedDecode`` is the metadata: a block table (B, W) and the context
lengths (B,). ``paged_decode`` runs it: the Triton kernel
(``triton_paged_decode``) on CUDA, where it costs the sum of the contexts; a
plain PyTorch version elsewhere, which pads the batch to W blocks. Both have
fixed shapes for a given (B, W) and no host synchronisation, so a CUDA graph
can capture either. The PyTorch version is also the reference the kernel is
tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenworks.model.kernel_check import compare, have_triton
from tokenworks.model.kv_cache import widen


@dataclass
class PagedDecode:
    block_table: torch.Tensor  # (B, W) int32/int64, rows padded with block 0
    context_lens: torch.Tensor  # (B,) tokens each row attends to (>= 1 for rows whose output is used)


def triton_available(device: str | torch.device) -> bool:
    """The Triton kernel runs on CUDA when triton is installed (it ships with CUDA builds of PyTorch). Asked once
    per layer of an eager step: the module search is done once."""
    return torch.device(device).type == "cuda" and have_triton()


def context_mask(context_lens: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """(B, 1, 1, width * block_size) bool: True where a row's gathered slot lies inside its context."""
    slots = torch.arange(width * block_size, device=context_lens.device)
    return (slots.unsqueeze(0) < context_lens.unsqueeze(1))[:, None, None, :]


def gathered_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, D) -> (B, H, D): gather each row's W blocks into a padded batch, one masked SDPA call."""
    b, width = block_table.shape
    bs = k_cache.shape[1]
    flat = block_table.flatten().long()
    # index_select, not k_cache[bt]: 4x faster on CPU for this strided per-layer view.
    # widen: a pool narrower than the model's dtype (--kv-cache-dtype) is widened as it is gathered
    kd = widen(k_cache.index_select(0, flat).view(b, width * bs, *k_cache.shape[2:]), q.dtype).transpose(1, 2)
    vd = widen(v_cache.index_select(0, flat).view(b, width * bs, *v_cache.shape[2:]), q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def paged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, D) -> (B, H, D) with the mask made from the context lengths (graph-safe: fixed shapes)."""
    mask = context_mask(context_lens, block_table.shape[1], k_cache.shape[1])
    return gathered_decode(q, k_cache, v_cache, block_table, mask, scale)


@functools.lru_cache(maxsize=None)
def kernel_check(device: str, dtype: torch.dtype) -> str:
    """Why the Triton kernel should not be used on ``device`` ("" when it gives the reference's result on a small
    case: GQA 3:1, scattered blocks, contexts across blocks). Run once at load, so that a kernel that fails to
    compile or computes wrongly on some GPU costs its speed, not the engine."""
    g = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(6, 16, 2, 64, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(3, 6, 64, generator=g).to(device=device, dtype=dtype)
    table = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 5, 40], dtype=torch.int32, device=device)

    def case(kernel: bool) -> list[torch.Tensor]:
        if not kernel:
            return [paged_decode_torch(q, kc, vc, table, lens, 0.125)]
        from tokenworks.model.triton_paged_decode import paged_decode as run

        return [run(q, kc, vc, table, lens, 0.125)]

    return compare({"paged_decode": case}, dtype)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedDecode,
                 scale: float) -> torch.Tensor:
    if triton_available(q.device):
        from tokenworks.model.triton_paged_decode import paged_decode as kernel

        return kernel(q, k_cache, v_cache, meta.block_table, meta.context_lens, scale)
    return paged_decode_torch(q, k_cache, v_cache, meta.block_table, meta.context_lens, scale)
