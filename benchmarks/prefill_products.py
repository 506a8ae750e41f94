"""Prefill of the default model (its 4-bit layers on the native kernels) with its products of many rows taken three
ways, alternated in one process: the native tiles (the baseline), and W dequantized whole and multiplied on
PyTorch's BLAS in float32 and in bfloat16 (oneDNN; fast where the CPU has AMX). The engine picks one of the wide
ways by the CPU (``quantized_linear.wide_products``); this measures all three on this machine.

Prints, per prompt length, the median time of a whole prefill (first token included) over the rounds, and each
way's ratio to the tiles: the median of the rounds' ratios (this machine is shared; each round times the three
ways back to back).

    python benchmarks/prefill_products.py [--lengths 64,512,2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

# each way as what ``quantized_linear.wide_products`` returns for it: (dtype, the fewest rows that go wide)
WAYS = {"tiles": (torch.float32, 1 << 30), "wide float32": (torch.float32, 1), "wide bfloat16": (torch.bfloat16, 1)}


def prefill_ms(engine, length: int, serial: list[int]) -> float:
    from tokenworks import SamplingParams

    serial[0] += 1
    prompt = [(7 * serial[0] + 13 * j) % 40000 + 100 for j in range(length)]  # never a prefix-cache hit
    t = time.perf_counter()
    engine.add_request(f"prefill-{serial[0]}", prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,512,2048", help="prompt lengths (tokens)")
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args()
    from tokenworks import LLM
    from tokenworks.model import cpu_native, quantized_linear

    lengths = [int(n) for n in ns.lengths.split(",")]
    llm = LLM(max_model_len=max(lengths) + 16)
    if cpu_native.library() is None:
        print(f"the native kernels are unavailable here ({cpu_native.unavailable_reason()}): nothing to compare")
        return 1
    chosen = quantized_linear.wide_products()
    amx = "amx_bf16" in cpu_native.cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU {'with' if amx else 'without'} AMX; "
          f"the engine's choice here: {chosen[0]} from {chosen[1]} rows", flush=True)
    real = quantized_linear.wide_products
    serial = [0]
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(-1, ns.rounds):  # round -1 warms each way and length, untimed
            for length in lengths:
                for way, choice in WAYS.items():
                    quantized_linear.wide_products = lambda choice=choice: choice
                    ms = prefill_ms(llm.engine, length, serial)
                    if r >= 0:
                        times.setdefault((way, length), []).append(ms)
            if r >= 0:
                print(f"round {r + 1}/{ns.rounds} done", flush=True)
    finally:
        quantized_linear.wide_products = real
    for length in lengths:
        base = times[("tiles", length)]
        line = [f"prefill {length:5d} tokens: tiles {statistics.median(base):8.1f} ms"]
        for way in list(WAYS)[1:]:
            got = times[(way, length)]
            ratio = statistics.median(g / b for g, b in zip(got, base))
            line.append(f"{way} {statistics.median(got):8.1f} ms ({ratio:.2f}x)")
        print(";  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
