"""Checks, when an engine loads, that its GPU kernels give their PyTorch reference's result on this device.

A kernel that fails to compile or computes wrongly on some GPU should cost its speed, not the engine: the
callers (``fused.kernel_check``, ``paged_decode.kernel_check``) run a few small cases through both paths here
and use the kernels only when this returns "".
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch


@functools.lru_cache(maxsize=1)
def have_triton() -> bool:
    """Whether triton is installed (it ships with CUDA builds of PyTorch); the module search done once."""
    return importlib.util.find_spec("triton") is not None


def compare(cases: dict[str, Callable[[bool], list[torch.Tensor]]], dtype: torch.dtype) -> str:
    """Each case's outputs with the kernel (``case(True)``) against the reference's (``case(False)``): "" when all
    agree within ``dtype``'s tolerance, else the first failing case's name and what went wrong."""
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, case in cases.items():
        try:
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(case(True), case(False)))
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return f"{name}: {type(e).__name__}: {first}"
        if err > tolerance:
            return f"{name} differs from the reference by {err:.3g}"
    return ""
