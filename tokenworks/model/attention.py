"""Attention over the paged KV pool.

One step's batch holds decodes (one query token each) and prefill chunks.
Decodes are attended together: their blocks are gathered into a padded
``(B, S, H_kv, D)`` batch with a length mask. Each prefill chunk is attended
on its own: against its freshly computed K/V when it starts at position 0
(plain causal attention), else against its gathered blocks with an offset
causal mask (chunked prefill, prefix-cache hits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    start: int  # first row of this sequence in the flattened batch
    end: int
    block_table: torch.Tensor | None  # (num_blocks,) long; None when start_position == 0
    context_len: int
    mask: torch.Tensor | None  # (q_len, context_len) bool, True = attend; None for plain causal


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # (T,) block id of each token's KV slot
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    decode_rows: torch.Tensor | None  # (B,) rows of the decode tokens in the batch
    decode_block_table: torch.Tensor | None  # (B, max_blocks), padded with block 0
    decode_mask: torch.Tensor | None  # (B, 1, 1, max_blocks * block_size) bool
    prefills: list[PrefillSeq]
    decode_rows_contiguous: bool  # decodes are rows [0, B): slice instead of index


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v


def paged_attention(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, H_kv, D), already written to the cache
    v: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        bt = meta.decode_block_table
        b, width = bt.shape
        flat = bt.flatten()
        # index_select, not k_cache[bt]: 4x faster on CPU for this strided per-layer view.
        kd = k_cache.index_select(0, flat).view(b, width * k_cache.shape[1], *k_cache.shape[2:]).transpose(1, 2)
        vd = v_cache.index_select(0, flat).view(b, width * v_cache.shape[1], *v_cache.shape[2:]).transpose(1, 2)
        if meta.decode_rows_contiguous:
            qd = q[:b].unsqueeze(2)  # (B, H, 1, D)
        else:
            qd = q[meta.decode_rows].unsqueeze(2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        if meta.decode_rows_contiguous:
            out[:b] = od.squeeze(2)
        else:
            out[meta.decode_rows] = od.squeeze(2)
    for p in meta.prefills:
        qp = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        if p.block_table is None:
            kp = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
            vp = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp = k_cache.index_select(0, p.block_table).flatten(0, 1)[: p.context_len].transpose(0, 1).unsqueeze(0)
            vp = v_cache.index_select(0, p.block_table).flatten(0, 1)[: p.context_len].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.start : p.end] = op.squeeze(0).transpose(0, 1)
    return out
