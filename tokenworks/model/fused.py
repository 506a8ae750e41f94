"""The layer's small operations, each one kernel on CUDA: fewer launches per decode step.

- ``add_rms_norm``: the residual add and the next RMSNorm (the post-attention
  norm, the next layer's input norm, the final norm);
- ``silu_mul``: the MLP's SiLU(gate) x up on the gate/up projection's output;
- ``rope_write_kv``: the rotary embedding of queries and keys, and the new
  keys and values written into their KV slots.

With ``kernel=True`` they run as the Triton kernels in ``triton_fused.py``
(one launch each where PyTorch takes two to nine); otherwise, and as the
reference those kernels are tested against, as the plain PyTorch below, which
is what the layer ran before the kernels existed. The model decides once, at
load, with ``kernels_problem(device, dtype)``: on CUDA when Triton is installed
and each kernel passes a check against the reference there, unless
``TOKENWORKS_FUSED=0`` (to measure what they buy).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from tokenworks.model.kernel_check import compare, have_triton
from tokenworks.model.kv_cache import store_rows


def kernels_problem(device: str | torch.device, dtype: torch.dtype) -> str:
    """Why the Triton kernels should not run for ``dtype`` tensors on ``device``; "" when they should (CUDA, Triton
    installed, not ``TOKENWORKS_FUSED=0``, and each kernel gave the reference's result on a small case)."""
    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if os.environ.get("TOKENWORKS_FUSED", "1") == "0":
        return "TOKENWORKS_FUSED=0"
    if not have_triton():
        return "no triton"
    return kernel_check(str(device), dtype)


@functools.lru_cache(maxsize=None)
def kernel_check(device: str, dtype: torch.dtype) -> str:
    """"" when every kernel matches the reference on small cases on ``device``, else which failed and how: run once
    at load, so that a kernel that fails to compile or computes wrongly on some GPU costs its speed, not the engine."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    h, delta, w, gate_up, qkv = rand(3, 96), rand(3, 96), rand(96), rand(3, 2 * 80), rand(3, 8 * 16)
    table = rand(32, 8)
    rot = Rotary(torch.tensor([0, 7, 31], device=device), table, table.flip(0).contiguous())
    slots = (torch.tensor([1, 2, 2], device=device), torch.tensor([0, 3, 1], device=device))
    qk, v = qkv[:, : 6 * 16].view(3, 6, 16), qkv[:, 6 * 16 :].view(3, 2, 16)

    def rope_case(kernel: bool) -> list[torch.Tensor]:
        pool = torch.zeros(4, 2, 4, 2, 16, device=device, dtype=dtype)
        return [rope_write_kv(qk, v, rot, pool[:, 0], pool[:, 1], *slots, 4, kernel=kernel), pool]

    cases = {"add_rms_norm": lambda k: list(add_rms_norm(h, delta, w, 1e-5, kernel=k)),
             "silu_mul": lambda k: [silu_mul(gate_up, kernel=k)], "rope_write_kv": rope_case}
    return compare(cases, dtype)


@dataclass
class Rotary:
    """A step's rotary embedding: each row's position and the model's cos/sin tables (max_position, D/2)."""

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor

    @cached_property
    def cos(self) -> torch.Tensor:  # (T, 1, D/2), gathered once per step for the PyTorch path
        return self.cos_table[self.positions].unsqueeze(1)

    @cached_property
    def sin(self) -> torch.Tensor:
        return self.sin_table[self.positions].unsqueeze(1)


def rope(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """x (T, H, D) rotated in the "rotate half" layout (Hugging Face's)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * rot.cos - x2 * rot.sin, x2 * rot.cos + x1 * rot.sin), dim=-1)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta) * weight), both (T, hidden)."""
    if kernel:
        from tokenworks.model.triton_fused import add_rms_norm as run

        return run(h, delta, weight, eps)
    h = h + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def silu_mul(gate_up: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """(T, 2I) gate and up side by side -> (T, I) SiLU(gate) * up."""
    if kernel:
        from tokenworks.model.triton_fused import silu_mul as run

        return run(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_write_kv(qk: torch.Tensor, v: torch.Tensor, rot: Rotary, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, num_heads: int,
                  kernel: bool = False) -> torch.Tensor:
    """qk (T, H + H_kv, D) -> the same rotated; the rotated keys and ``v`` (T, H_kv, D) written to the cache
    slots (``slot_blocks``, ``slot_offsets``) of caches shaped (num_blocks, block_size, H_kv, D)."""
    if kernel:
        from tokenworks.model.triton_fused import rope_write_kv as run

        return run(qk, v, rot.positions, rot.cos_table, rot.sin_table, k_cache, v_cache, slot_blocks, slot_offsets,
                   num_heads)
    out = rope(qk, rot)
    store_rows(k_cache, slot_blocks, slot_offsets, out[:, num_heads:])  # the pool's dtype may be narrower
    store_rows(v_cache, slot_blocks, slot_offsets, v)
    return out
