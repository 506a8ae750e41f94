"""4-bit linears on the CPU, straight from a GGUF file's Q4_0 / Q4_1 blocks.

A GGUF Q4 block holds 32 weights of one row as 4-bit codes q in 0..15 and a
scale d (Q4_1 also a minimum m): w = d * (q - 8) for Q4_0, w = d * q + m for
Q4_1. PyTorch's weight-only int4 CPU kernel (``_weight_int4pack_mm_for_cpu``)
computes with w = scale * (q - 8) + zero per group of 32 along the input, so
both formats map onto it code for code: scale = d, zero = 0 (Q4_0) or
m + 8 d (Q4_1). Only the scales and zeros are rounded, to bfloat16 (the
kernel's type; GGUF keeps them in float16), and activations enter the kernel
in bfloat16. A decode step reads an eighth of the layers' float32 bytes:
SmolLM2-135M's batch-1 step 1.7x faster on a 2-core AVX2 machine, but 0.84x
at batch 32, where the kernel is slower than a float32 matmul
(benchmarks/quantized.py, docs/engine.md).

Where the native kernels build (``cpu_native``, the default), they run the
layers on GGUF's blocks as stored and the int4 kernel above is the fallback.
Where the CPU has AMX, products of a few rows and more (a decode batch, a
prefill chunk) run on its tiles in the native kernel (``cpu_native/amx.c``).
Elsewhere a product of many activation rows (a prefill chunk) has the native
kernel write W out whole into a scratch matrix and multiplies on PyTorch's
BLAS instead (``wide_products``).

``Q4Weight`` is the unpacked form the loader builds (rows can be permuted and
matrices stacked, as the model fuses q/k/v and gate/up); ``Int4Linear`` is
the packed layer with the same call interface as ``linear.Linear``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from tokenworks.model import cpu_native

GROUP = 32  # weights per GGUF Q4 block, and the kernel's group size
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def _float16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """(rows, groups) float32: the float16 at byte ``at`` of each GGUF block in (rows, groups, block bytes)."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16).reshape(blocks.shape[0], -1).astype(np.float32)


@dataclass
class Q4Weight:
    """An (N, K) weight as 4-bit codes with a scale and zero per row and group of 32 inputs."""

    codes: torch.Tensor  # (N, K) uint8 in 0..15
    scale: torch.Tensor  # (N, K // 32) float32
    zero: torch.Tensor  # (N, K // 32) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @classmethod
    def from_gguf(cls, data: np.ndarray, kind: str, rows: int, cols: int) -> "Q4Weight":
        """``data``: the tensor's raw bytes as GGUF stores them, ``rows`` x (``cols`` / 32) blocks."""
        size = _BLOCK_BYTES[kind]
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // GROUP, size)
        d = _float16_field(blocks, 0)
        if kind == "Q4_1":
            m = _float16_field(blocks, 2)
            packed = blocks[..., 4:]
            zero = m + 8 * d
        else:
            packed = blocks[..., 2:]
            zero = np.zeros_like(d)
        codes = np.empty((rows, cols // GROUP, GROUP), dtype=np.uint8)
        np.bitwise_and(packed, 0x0F, out=codes[..., : GROUP // 2])  # low nibbles: inputs 0..15 of a block
        np.right_shift(packed, 4, out=codes[..., GROUP // 2 :])
        return cls(torch.from_numpy(codes.reshape(rows, cols)), torch.from_numpy(d), torch.from_numpy(zero))

    def rows(self, index: torch.Tensor) -> "Q4Weight":
        return Q4Weight(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def stack(parts: list["Q4Weight"]) -> "Q4Weight":
        """The matrices one above the other (their outputs concatenated)."""
        return Q4Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]))

    def nibbles(self) -> torch.Tensor:
        """(N, K / 2) uint8 in GGUF's block order: byte i of a group holds inputs i (low) and i + 16 (high)."""
        n, k = self.shape
        g = self.codes.view(n, k // GROUP, GROUP)
        return (g[..., : GROUP // 2] | (g[..., GROUP // 2 :] << 4)).reshape(n, k // 2).contiguous()

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32: what the codes mean, with scales and zeros as the kernel rounds them."""
        s = self.scale.to(torch.bfloat16).float().repeat_interleave(GROUP, 1)
        z = self.zero.to(torch.bfloat16).float().repeat_interleave(GROUP, 1)
        return (self.codes.float() - 8) * s + z


@dataclass
class Q8Weight:
    """An (N, K) weight as GGUF Q8_0: int8 values with a scale per row and group of 32 inputs (w = d * q)."""

    codes: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K // 32) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @classmethod
    def from_gguf(cls, data: np.ndarray, rows: int, cols: int) -> "Q8Weight":
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // GROUP, 2 + GROUP)
        d = _float16_field(blocks, 0)
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
        return cls(torch.from_numpy(codes), torch.from_numpy(d))

    def dequantize(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) float32, or the rows ``ids`` only."""
        codes, scale = (self.codes, self.scale) if ids is None else (self.codes[ids], self.scale[ids])
        return codes.float() * scale.repeat_interleave(GROUP, 1)


class _Scratch(threading.local):
    """A dequantized weight matrix lives here only while one product uses it: one buffer per thread and dtype,
    grown to the largest matrix asked for (about 7 MB for the default model's gate/up)."""

    def __init__(self) -> None:
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def matrix(self, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        flat = self.flat.get(dtype)
        if flat is None or flat.numel() < rows * cols:
            flat = self.flat[dtype] = torch.empty(rows * cols, dtype=dtype)
        return flat[: rows * cols].view(rows, cols)


_scratch = _Scratch()


def many_rows() -> str:
    """How this machine's 4-bit layers multiply many activation rows (for the start-up line)."""
    if cpu_native.amx_rows():
        return f"products of {cpu_native.amx_rows()}+ rows (batches, prefill) on AMX tiles in bfloat16"
    if cpu_native.bf16_rows():
        return f"products of {cpu_native.bf16_rows()}+ rows (batches, prefill) on AVX512-BF16 in bfloat16"
    dtype, rows = wide_products()
    return f"products of {rows}+ rows (prefill) on {str(dtype).removeprefix('torch.')} matmuls"


def wide_products() -> tuple[torch.dtype, int]:
    """Products of many activation rows (prefill chunks) dequantize W whole into a scratch matrix and multiply on
    PyTorch's BLAS; returns (the dtype they multiply in, the fewest rows that go that way). bfloat16 from 32 rows
    where the CPU multiplies bfloat16 natively (AVX512-BF16, which every AMX CPU has: oneDNN's bfloat16 matmul 4x
    float32's rate on a Zen CPU, 6x on an AMX one; prefills 0.41-0.52x the float32 way's time on the first,
    0.27-0.38x on the second; the default model's perplexity 1.0008x float32's), else float32 from 64 (the GGUF's
    weights exactly; 0.4x the native tiles' time at 512 rows, 0.83x at 64, on an AMX machine: docs/engine.md)."""
    return (torch.bfloat16, 32) if "avx512_bf16" in cpu_native.cpu_flags() else (torch.float32, 64)


class Int8Linear:
    """y = x @ W.T for a Q8_0 W on the native kernel; its rows double as a tied embedding table."""

    def __init__(self, weight: Q8Weight) -> None:
        lib = cpu_native.library()
        if lib is None:
            raise RuntimeError(f"8-bit linears need the native kernels: {cpu_native.unavailable_reason()}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.native = cpu_native.NativeQ8(lib, weight.codes, weight.scale)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        return self.native.nbytes

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(ids)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.native(x).to(x.dtype)


class Int4Linear:
    """y = x @ W.T + b for a 4-bit W: on the native kernel (``cpu_native.NativeQ4``, GGUF's layout) where it
    builds, else packed for PyTorch's int4 CPU kernel."""

    def __init__(self, weight: Q4Weight, bias: torch.Tensor | None = None, native: bool = True) -> None:
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise ValueError(f"int4 linear needs inputs in groups of {GROUP}, got {self.in_features}")
        self.bias = bias
        lib = cpu_native.library() if native else None
        self.native = None if lib is None else cpu_native.NativeQ4(lib, weight.nibbles(), weight.scale,
                                                                     weight.zero - 8 * weight.scale, bias)
        if self.native is not None:
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32).contiguous(), 1)
        # (K / 32, N, 2): scale and zero of each group, the kernel's layout.
        self.scales_zeros = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    @property
    def nbytes(self) -> int:
        """Bytes one pass reads: the packed codes, the scales and zeros, the bias."""
        if self.native is not None:
            return self.native.nbytes
        return (self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2
                + (0 if self.bias is None else self.bias.numel() * self.bias.element_size()))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        return y.to(x.dtype)

    def _wide(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Many rows: W dequantized whole (the native kernel, d q + m) and multiplied on PyTorch's BLAS."""
        w = self.native.dequantize_into(_scratch.matrix(dtype, self.out_features, self.in_features))
        y = torch.nn.functional.linear(x.to(dtype), w).float()
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def halves(self, x: torch.Tensor) -> torch.Tensor:
        """(2, M, out/2): the two halves of the output (for gate/up fused weights)."""
        return self(x).view(x.shape[0], 2, -1).transpose(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            if self.native.panels is None or not cpu_native.amx_rows():  # no AMX: many rows on PyTorch's BLAS
                dtype, rows = wide_products()
                if x.shape[0] >= rows:
                    return self._wide(x, dtype)
            return self.native(x).to(x.dtype)
        y = self._mm(x)
        return y if self.bias is None else y + self.bias
