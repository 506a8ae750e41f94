"""Matrix-vector products that use every CPU core.

On CPU, MKL runs a skinny ``x @ W.T`` (a decode step's few rows) on one
thread, reaching about half of the memory bandwidth. Storing W as two
column halves, ``(2, in, out/2)``, and multiplying with one batched matmul
gives each core one half: measured here, 1.6x faster at 1 row and never
slower up to 512 rows (benchmarks/engine.py reports the effect). On CUDA the
plain layout is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    """y = x @ W.T + b for x of shape (M, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.split = weight.device.type == "cpu" and self.out_features % 2 == 0
        if self.split:
            half = self.out_features // 2
            self.weight = weight.t().reshape(self.in_features, 2, half).permute(1, 0, 2).contiguous()
        else:
            self.weight = weight.contiguous()

    @property
    def numel(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())

    @property
    def nbytes(self) -> int:
        """Bytes one pass reads."""
        return self.numel * self.weight.element_size()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W, (len(ids), in): a tied embedding looks tokens up here instead of keeping a copy."""
        if self.split:
            half = self.out_features // 2
            return self.weight[ids // half, :, ids % half]
        return F.embedding(ids, self.weight)

    def halves(self, x: torch.Tensor) -> torch.Tensor:
        """(2, M, out/2): the two halves of the output (for gate/up fused weights)."""
        if self.split:
            return torch.bmm(x.unsqueeze(0).expand(2, *x.shape), self.weight)
        y = F.linear(x, self.weight)
        return y.view(x.shape[0], 2, -1).transpose(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            y = torch.bmm(x.unsqueeze(0).expand(2, *x.shape), self.weight).transpose(0, 1).reshape(x.shape[0], -1)
        else:
            y = F.linear(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y
