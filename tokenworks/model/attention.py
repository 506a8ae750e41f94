"""Attention over the paged KV pool.

One step's batch holds decodes (one query token each) and prefill chunks.
Decodes come longest first and are attended in groups of similar length
(``decode_groups``): each group's blocks are gathered into a padded
``(b, S, H_kv, D)`` batch with a length mask, so a step's decode attention
costs about the sum of the contexts, not batch x longest (one 4k-token
request among 31 short ones is its own group). Each prefill chunk is attended
on its own: against its freshly computed K/V when it starts at position 0
(plain causal attention), else against its gathered blocks with an offset
causal mask (chunked prefill, prefix-cache hits).

With ``paged`` set instead (CUDA, and every decode step replayed as a CUDA
graph), all decode rows are attended in one ``paged_decode`` call through
their block tables: on CUDA a Triton kernel that reads each row's own context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenworks.model.kv_cache import widen
from tokenworks.model.paged_decode import PagedDecode, gathered_decode, paged_decode


@dataclass
class PrefillSeq:
    start: int  # first row of this sequence in the flattened batch
    end: int
    block_table: torch.Tensor | None  # (num_blocks,) long; None when start_position == 0
    context_len: int
    mask: torch.Tensor | None  # (q_len, context_len) bool, True = attend; None for plain causal


@dataclass
class DecodeGroup:
    start: int  # rows [start, end) of the flattened batch: decodes of similar length
    end: int
    block_table: torch.Tensor  # (end - start, max_blocks), padded with block 0
    mask: torch.Tensor  # (end - start, 1, 1, max_blocks * block_size) bool, True = attend


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # (T,) block id of each token's KV slot
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    decodes: list[DecodeGroup]  # rows [0, B) of the batch, longest first
    prefills: list[PrefillSeq]
    paged: PagedDecode | None = None  # instead of ``decodes``: rows [0, B) in one paged_decode call


def decode_groups(widths: list[int], overhead: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of decodes sorted by width in blocks (longest first) to attend together, each padded
    to its first width: the fewest padded blocks plus ``overhead`` blocks for each group (what one more
    attention call costs). One group when padding wastes less than that: the common case."""
    n = len(widths)
    if n == 0:
        return []
    if n * widths[0] - sum(widths) <= overhead:
        return [(0, n)]
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            if i and widths[i] == widths[i - 1]:
                continue  # a group never starts inside a run of equal widths
            cost = best[i] + (j - i) * widths[i] + overhead
            if cost < best[j]:
                best[j], start[j] = cost, i
    out, j = [], n
    while j:
        out.append((start[j], j))
        j = start[j]
    return out[::-1]


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
    if meta.paged is not None:
        b = meta.paged.block_table.shape[0]
        out[:b] = paged_decode(q[:b], k_cache, v_cache, meta.paged, scale)
    for g in meta.decodes:
        out[g.start : g.end] = gathered_decode(q[g.start : g.end], k_cache, v_cache, g.block_table, g.mask, scale)
    for p in meta.prefills:
        qp = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        if p.block_table is None:
            kp = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
            vp = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp, vp = (widen(c.index_select(0, p.block_table).flatten(0, 1)[: p.context_len], q.dtype)
                      .transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.start : p.end] = op.squeeze(0).transpose(0, 1)
    return out
