"""Copies between host and device that never make the host wait for the device.

A step's inputs go up from pinned host memory and its sampled tokens come
back into pinned host memory, both queued behind the device's work, so the
host can prepare the next step while the device still runs this one
(overlapped scheduling, engine/engine.py). A plain ``torch.tensor(data,
device="cuda")`` or ``.tolist()`` on a CUDA tensor waits for everything
queued before it. On the CPU these are the plain operations.
"""

from __future__ import annotations

import torch


def to_device(data: list, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``, the host-to-device copy queued without waiting (CUDA)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Device tensors' copies to the host, started now and waited for in ``get``."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host = tensors
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self._host, tensors):
            h.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
