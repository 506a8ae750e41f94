"""The floor: a plain PyTorch decode step of a Llama-shaped model with no serving engine around it.

Static KV cache (one dense ``(batch, context, kv_heads, head_dim)`` tensor per
layer), one decode step for a batch of equal-length rows, captured once as a
CUDA graph and replayed (eager on the CPU). It is what the hardware does from
PyTorch for this shape; ``benchmarks/engine.py`` reports the engine's decode
step against it, measured in the same run. Random weights, made on the device.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from tokenworks.config import ModelConfig
from tokenworks.model.llama import rope_inv_freq


class FloorDecode:
    def __init__(self, c: ModelConfig, batch: int, context: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)

        self.c, self.batch, self.context, self.device = c, batch, context, device
        self.embed = rand(c.vocab_size, c.hidden_size)
        self.lm_head = self.embed if c.tie_word_embeddings else rand(c.vocab_size, c.hidden_size)
        ones = torch.ones(c.hidden_size, dtype=dtype, device=device)
        self.layers = [dict(qkv=rand(c.q_size + 2 * c.kv_size, c.hidden_size), o=rand(c.hidden_size, c.q_size),
                            gate_up=rand(2 * c.intermediate_size, c.hidden_size),
                            down=rand(c.hidden_size, c.intermediate_size), n1=ones, n2=ones)
                       for _ in range(c.num_layers)]
        self.norm = ones
        shape = (batch, context, c.num_kv_heads, c.head_dim)
        self.k = [rand(*shape) for _ in range(c.num_layers)]
        self.v = [rand(*shape) for _ in range(c.num_layers)]
        freqs = torch.outer(torch.arange(context, dtype=torch.float32), rope_inv_freq(c))
        self.cos, self.sin = freqs.cos().to(device, dtype), freqs.sin().to(device, dtype)
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.full((1,), context - 1, dtype=torch.long, device=device)  # the last slot: all attended
        self.graph = None

    @property
    def weight_bytes(self) -> int:
        n = sum(t.numel() for layer in self.layers for t in layer.values()) + self.embed.numel() + self.norm.numel()
        if self.lm_head is not self.embed:
            n += self.lm_head.numel()
        return n * self.embed.element_size()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        c, b = self.c, self.batch
        cos, sin = self.cos[self.pos].unsqueeze(1), self.sin[self.pos].unsqueeze(1)
        h = F.embedding(self.ids, self.embed)
        for i, w in enumerate(self.layers):
            x = F.rms_norm(h, (c.hidden_size,), w["n1"], c.rms_norm_eps)
            qkv = F.linear(x, w["qkv"]).view(b, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
            qk = self._rope(qkv[:, : c.num_heads + c.num_kv_heads], cos, sin)
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
            self.k[i].index_copy_(1, self.pos, k.unsqueeze(1))
            self.v[i].index_copy_(1, self.pos, qkv[:, c.num_heads + c.num_kv_heads:].unsqueeze(1))
            o = F.scaled_dot_product_attention(q.unsqueeze(2), self.k[i].transpose(1, 2), self.v[i].transpose(1, 2),
                                               enable_gqa=True)
            h = h + F.linear(o.reshape(b, c.q_size), w["o"])
            x = F.rms_norm(h, (c.hidden_size,), w["n2"], c.rms_norm_eps)
            gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w["down"])
        return F.linear(F.rms_norm(h, (c.hidden_size,), self.norm, c.rms_norm_eps), self.lm_head)

    def capture(self) -> None:
        if torch.device(self.device).type != "cuda":
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step()

    def median_ms(self, reps: int = 20) -> float:
        cuda = torch.device(self.device).type == "cuda"
        run = self.graph.replay if self.graph is not None else self.step
        run()
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3


def floor_decode_ms(c: ModelConfig, batch: int, context: int, dtype: torch.dtype, device: str, reps: int = 20) -> float:
    """Median ms of one floor decode step (batch rows, each attending to ``context`` tokens)."""
    floor = FloorDecode(c, batch, context, dtype, device)
    floor.capture()
    ms = floor.median_ms(reps)
    del floor
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return ms
