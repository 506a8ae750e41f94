"""Each fused kernel (model/triton_fused.py) against the PyTorch operations it replaces, same run, same device.

A decode step replays a CUDA graph, so what a kernel costs there is its own
time plus the gap between graph nodes, not a Python launch. Each case is
therefore captured as a CUDA graph of ``--layers`` calls in a row (one per
layer, as in the model) and replayed; the figure is the median microseconds
per call over ``--reps`` replays. Shapes: the model shape's hidden,
intermediate, head sizes, at decode batches (tokens per step).

    python benchmarks/fused_ops.py --shape smollm2-135m --tokens 1,64
    python benchmarks/fused_ops.py --shape llama-3.1-8b
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this tree's tokenworks
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import SHAPES, shape_config  # noqa: E402

from tokenworks.model.fused import Rotary, add_rms_norm, rope_write_kv, silu_mul  # noqa: E402


def graph_us(fn, layers: int, reps: int) -> float:
    """Median µs per call of ``fn`` captured ``layers`` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return statistics.median(times)


def cases(c, tokens: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(tokens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device).to(dtype)

    h, delta, w = rand(tokens, c.hidden_size), rand(tokens, c.hidden_size), rand(c.hidden_size)
    gate_up = rand(tokens, 2 * c.intermediate_size)
    heads = c.num_heads + c.num_kv_heads
    qkv = rand(tokens, (heads + c.num_kv_heads) * c.head_dim)
    qk = qkv[:, : heads * c.head_dim].view(tokens, heads, c.head_dim)
    v = qkv[:, heads * c.head_dim:].view(tokens, c.num_kv_heads, c.head_dim)
    blocks = 4 * tokens + 8
    pool = rand(blocks, 2, 2, 16, c.num_kv_heads, c.head_dim)
    table = rand(4096, c.head_dim // 2)
    rot = Rotary(torch.arange(tokens, device=device) * 7, table, table.flip(0).contiguous())
    slot_blocks = torch.arange(tokens, device=device) * 3 + 1
    slot_offsets = torch.arange(tokens, device=device) % 16
    return {
        "add + rms_norm": lambda k: add_rms_norm(h, delta, w, 1e-5, kernel=k),
        "silu(gate) * up": lambda k: silu_mul(gate_up, kernel=k),
        "rope + KV write": lambda k: rope_write_kv(qk, v, rot, pool[:, 1, 0], pool[:, 1, 1], slot_blocks,
                                                   slot_offsets, c.num_heads, kernel=k),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=SHAPES)
    ap.add_argument("--tokens", default="1,64", help="tokens per step (decode batch sizes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=30, help="calls per captured graph")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fused_ops.py times CUDA graphs and needs a GPU (the kernels' CPU check is tests/test_triton_fused.py)")
        return 2
    c = shape_config(args.shape)
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.shape}, {args.dtype}, {args.layers} calls per graph")
    print(f"{'operation':<18}{'tokens':>7}{'PyTorch µs':>12}{'fused µs':>10}{'speed-up':>10}")
    total = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, fn in cases(shape_config(args.shape), tokens, dtype, "cuda").items():
            ref = graph_us(lambda: fn(False), args.layers, args.reps)
            fused = graph_us(lambda: fn(True), args.layers, args.reps)
            a, b = total.get(tokens, (0.0, 0.0))
            times = 2 if name == "add + rms_norm" else 1  # after attention and after the MLP
            total[tokens] = (a + times * ref, b + times * fused)
            print(f"{name:<18}{tokens:>7}{ref:>12.1f}{fused:>10.1f}{ref / fused:>9.2f}x", flush=True)
    for tokens, (ref, fused) in total.items():
        print(f"per layer, {tokens} tokens: {ref:.1f} µs -> {fused:.1f} µs ({ref / fused:.2f}x); "
              f"x {c.num_layers} layers: {(ref - fused) * c.num_layers / 1e3:.2f} ms a step saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
