"""The Llama family as one network: Llama 2/3, SmolLM, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Weights arrive under Hugging Face names; q/k/v and gate/up are fused into
one matrix each so a layer is four matmuls. The forward pass works on a
flattened batch of T tokens from many requests, (T, hidden), and writes
each token's K/V into the paged pool before attention reads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenworks.config import ModelConfig
from tokenworks.model.attention import AttentionMetadata, paged_attention
from tokenworks.model import fused
from tokenworks.model.fused import Rotary, add_rms_norm, rope_write_kv, silu_mul
from tokenworks.model.kv_cache import KVCache
from tokenworks.model.linear import Linear
from tokenworks.model import cpu_native
from tokenworks.model.quantized_linear import Int4Linear, Int8Linear, Q4Weight, Q8Weight


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device

        def w(name: str):
            if name not in weights:
                raise KeyError(f"checkpoint lacks tensor {name!r}")
            t = weights[name]
            return t if isinstance(t, (Q4Weight, Q8Weight)) else t.to(device=device, dtype=dtype).contiguous()

        def stack(*names: str):
            parts = [w(n) for n in names]
            return Q4Weight.stack(parts) if isinstance(parts[0], Q4Weight) else torch.cat(parts)

        def linear(weight, bias=None):
            return Int4Linear(weight, bias) if isinstance(weight, Q4Weight) else Linear(weight, bias)

        def output_matrix(weight):
            if isinstance(weight, Q8Weight):  # GGUF Q8_0: on the native kernel, else dequantized
                return Int8Linear(weight) if cpu_native.library() else Linear(weight.dequantize().to(dtype))
            return Linear(weight)

        embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = output_matrix(embed if config.tie_word_embeddings else w("lm_head.weight"))
        # Tied: tokens are looked up in the output matrix's own (CPU: split) layout, not in a second copy.
        self.embed = None if config.tie_word_embeddings else embed
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_bias = None
            if config.attention_bias:
                qkv_bias = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
            layer = {
                "input_norm": w(p + "input_layernorm.weight"),
                "post_norm": w(p + "post_attention_layernorm.weight"),
                "qkv": linear(stack(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_bias),
                "o": linear(w(a + "o_proj.weight")),
                "gate_up": linear(stack(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
                "down": linear(w(p + "mlp.down_proj.weight")),
                "q_norm": None,
                "k_norm": None,
            }
            if config.qk_norm:
                layer["q_norm"] = w(a + "q_norm.weight")
                layer["k_norm"] = w(a + "k_norm.weight")
            self.layers.append(layer)
        positions = torch.arange(config.max_position, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))  # (max_position, D/2)
        self.cos = freqs.cos().to(device=device, dtype=dtype)
        self.sin = freqs.sin().to(device=device, dtype=dtype)
        self.scale = config.head_dim**-0.5
        self.fused_problem = fused.kernels_problem(device, dtype)  # "" on CUDA when the Triton kernels work
        self.fused = not self.fused_problem  # the layer's small operations as Triton kernels

    @property
    def num_parameters(self) -> int:
        """Parameters of the network (a tied embedding counted once)."""
        embed = 0 if self.embed is None else (self.embed.codes if isinstance(self.embed, Q8Weight) else self.embed).numel()
        n = self.norm.numel() + self.lm_head.numel + embed
        for layer in self.layers:
            n += sum(t.numel if isinstance(t, (Linear, Int4Linear)) else t.numel() for t in layer.values()
                     if t is not None)
        return n

    @property
    def step_weight_bytes(self) -> int:
        """Weight bytes a decode step reads: every layer, the output matrix, the norms (not the embedding table)."""
        n = self.lm_head.nbytes + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            n += sum(t.nbytes if isinstance(t, (Linear, Int4Linear)) else t.numel() * t.element_size()
                     for t in layer.values() if t is not None)
        return n

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) embeddings (a tied table is read in the output matrix's layout)."""
        if self.embed is None:
            return self.lm_head.rows(ids)
        return self.embed.dequantize(ids) if isinstance(self.embed, Q8Weight) else F.embedding(ids, self.embed)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """(T,) token ids and positions -> (T, hidden) final hidden states (normed).

        Each residual add runs with the norm after it, the rotary embedding with the KV write, SiLU with the
        multiply (fused.py: one kernel each on CUDA)."""
        c = self.config
        eps = c.rms_norm_eps
        hd = c.head_dim
        rot = Rotary(positions, self.cos, self.sin)
        h = self.embed_tokens(input_ids)
        t = h.shape[0]
        x = F.rms_norm(h, (c.hidden_size,), self.layers[0]["input_norm"], eps) if self.layers else h
        norms = [layer["input_norm"] for layer in self.layers[1:]] + [self.norm]
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](x)
            qk, v = qkv.split([c.q_size + c.kv_size, c.kv_size], dim=-1)
            qk = qk.view(t, c.num_heads + c.num_kv_heads, hd)
            v = v.view(t, c.num_kv_heads, hd)
            if layer["q_norm"] is not None:
                q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
                qk = torch.cat([F.rms_norm(q, (hd,), layer["q_norm"], eps), F.rms_norm(k, (hd,), layer["k_norm"], eps)], 1)
            qk = rope_write_kv(qk, v, rot, kv.k[i], kv.v[i], meta.slot_blocks, meta.slot_offsets, c.num_heads,
                               kernel=self.fused)
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
            o = paged_attention(q, k, v, kv.k[i], kv.v[i], meta, self.scale)
            h, x = add_rms_norm(h, layer["o"](o.view(t, c.q_size)), layer["post_norm"], eps, kernel=self.fused)
            h, x = add_rms_norm(h, layer["down"](self._mlp(layer["gate_up"], x)), norms[i], eps, kernel=self.fused)
        return x if self.layers else F.rms_norm(h, (c.hidden_size,), self.norm, eps)

    def _mlp(self, gate_up, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up: from the two halves where the projection makes them apart (CPU split layout)."""
        if isinstance(gate_up, Linear) and gate_up.split:
            gate, up = gate_up.halves(x)
            return F.silu(gate) * up
        return silu_mul(gate_up(x), kernel=self.fused)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32."""
        return self.lm_head(hidden).float()
