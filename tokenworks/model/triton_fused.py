"""Triton kernels for the layer's small operations (see fused.py, which calls them and holds the reference).

Each works in float32 and rounds once, on store, to the tensor's dtype. One
program per row (``add_rms_norm``), per row and slice of the intermediate
size (``silu_mul``), per token and head (``rope_write_kv``: a key head's
program also writes that key and its value into the token's KV slot).

Importing this module needs ``triton``; ``TRITON_INTERPRET=1`` (set before the
import) runs the same kernels on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024  # intermediate columns per silu_mul program


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, x_out_ptr, n, eps,
                         stride_h, stride_d, stride_ho, stride_xo, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    s = (h + d).to(h_out_ptr.dtype.element_ty)  # the residual as stored: the norm reads the rounded sum
    tl.store(h_out_ptr + row * stride_ho + cols, s, mask=mask)
    s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_out_ptr + row * stride_xo + cols, (s * inv * w).to(x_out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = h.shape
    h_out = torch.empty_like(h)
    x_out = torch.empty_like(h)
    _add_rms_norm_kernel[(rows,)](h, delta, weight, h_out, x_out, n, eps,
                                  h.stride(0), delta.stride(0), h_out.stride(0), x_out.stride(0),
                                  BLOCK=triton.next_power_of_2(n))
    return h_out, x_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block)
    return out


@triton.jit
def _rope_write_kv_kernel(qk_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, kc_ptr, vc_ptr, blk_ptr, off_ptr,
                          stride_qt, stride_qh, stride_vt, stride_vh, stride_cos, stride_ot, stride_oh,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vch,
                          NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=mask, other=0.0).to(tl.float32)
    src = qk_ptr + t * stride_qt + head * stride_qh
    x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty)
    dst = out_ptr + t * stride_ot + head * stride_oh
    tl.store(dst + d, o1, mask=mask)
    tl.store(dst + HALF + d, o2, mask=mask)
    if head >= NUM_HEADS:  # a key head: the rotated key and the value go into the token's KV slot
        kv_head = head - NUM_HEADS
        blk = tl.load(blk_ptr + t)
        off = tl.load(off_ptr + t)
        kdst = kc_ptr + blk * stride_kb + off * stride_ks + kv_head * stride_kh
        tl.store(kdst + d, o1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kdst + HALF + d, o2.to(kc_ptr.dtype.element_ty), mask=mask)
        vsrc = v_ptr + t * stride_vt + kv_head * stride_vh
        vdst = vc_ptr + blk * stride_vb + off * stride_vs + kv_head * stride_vch
        tl.store(vdst + d, tl.load(vsrc + d, mask=mask, other=0.0), mask=mask)
        tl.store(vdst + HALF + d, tl.load(vsrc + HALF + d, mask=mask, other=0.0), mask=mask)


def rope_write_kv(qk: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_blocks: torch.Tensor,
                  slot_offsets: torch.Tensor, num_heads: int) -> torch.Tensor:
    """See fused.rope_write_kv. The last dimension of every tensor has unit stride."""
    tokens, heads, dim = qk.shape
    out = torch.empty((tokens, heads, dim), dtype=qk.dtype, device=qk.device)
    if tokens == 0:
        return out
    half = dim // 2
    _rope_write_kv_kernel[(tokens, heads)](
        qk, v, positions, cos_table, sin_table, out, k_cache, v_cache, slot_blocks, slot_offsets,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), cos_table.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=num_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
    )
    return out
