"""Decode attention over the paged KV pool as a Triton kernel (flash-decoding).

One program per (request, KV head, split of the context): it loads the
request's query heads that share this KV head (GQA in the kernel, padded to
16 rows for ``tl.dot``), walks its own context through its block table, and
keeps an online softmax in float32. K and V are widened to float32 as they are
loaded and multiplied as TF32 (exact for bfloat16 inputs, whose mantissa is
shorter; IEEE float32 for float32 caches): decode attention is bound by
reading the cache, not by the multiply, so tensor-core bf16 would buy nothing. A second kernel combines the splits by their
log-sum-exp. A step's attention therefore reads each request's own tokens
only: it costs the sum of the contexts, never batch x longest, and long
contexts are spread over several programs.

Importing this module needs ``triton``; ``TRITON_INTERPRET=1`` (set before the
import) runs the same kernels on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # tokens per inner iteration (any number of KV blocks)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_ptr, lse_ptr, scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + n
        tmask = t < end
        page = tl.load(table_ptr + b * stride_tb + t // KV_BLOCK, mask=tmask, other=0).to(tl.int64)  # no overflow: big pools
        slot = t % KV_BLOCK
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    has = total > 0
    out = acc / tl.where(has, total, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    tl.store(part_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :], out,
             mask=hmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    dmask = d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)  # empty splits: exp(-inf) = 0
    norm = tl.sum(w, 0)
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.where(norm > 0, norm, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


def num_splits_for(batch: int, num_kv_heads: int, target_programs: int = 256, most: int = 16) -> int:
    """Splits of each context so that batch x KV heads x splits fills the GPU (a power of two, 1..most)."""
    want = max(1, -(-target_programs // max(1, batch * num_kv_heads)))
    return min(most, triton.next_power_of_2(want))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q (B, H, D); caches (num_blocks, block_size, H_kv, D) with unit stride on D; block_table (B, W) int;
    context_lens (B,) int -> (B, H, D). Rows with context 0 give zeros."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    splits = num_splits or num_splits_for(batch, kv_heads)
    part = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 at least
    _split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_table, context_lens, part, lse, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)),
        KV_BLOCK=k_cache.shape[1], BLOCK_N=BLOCK_N, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
    )
    _combine_kernel[(batch, heads)](
        part, lse, out,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=dim, BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_S=max(2, splits),
    )
    return out
