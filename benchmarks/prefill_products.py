"""Prefill of the default model (its 4-bit layers on the native kernels) with its products of many rows taken in
each way this machine has, alternated in one process: layer by layer on the native int16 tiles (the baseline); W
dequantized whole and multiplied on PyTorch's BLAS in float32 and in bfloat16 (oneDNN); and the whole native step
with its products in bfloat16, on AMX tiles (cpu_native/amx.c) where the CPU has AMX, else on AVX512-BF16
(kernels.c: bf16_tile) where it has that. The engine picks the native step where it multiplies in bfloat16, else
one of the wide ways by the CPU (``quantized_linear.wide_products``).

Prints, per prompt length, the median time of a whole prefill (first token included) over the rounds, and each
way's ratio to the tiles: the median of the rounds' ratios (this machine is shared; each round times the ways
back to back).

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

# each way as (the rows from which products run on AMX, and on AVX512-BF16, 0: never, None: this machine's; what
# ``quantized_linear.wide_products`` returns for it: the dtype and the fewest rows that go wide; whether every
# step runs as one native call)
WAYS = {"tiles": (0, 0, (torch.float32, 1 << 30), False), "wide float32": (0, 0, (torch.float32, 1), False),
        "wide bfloat16": (0, 0, (torch.bfloat16, 1), False), "amx step": (None, 0, (torch.float32, 1 << 30), True),
        "avx512-bf16 step": (0, None, (torch.float32, 1 << 30), True)}


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
    runner = llm.engine.runner
    before = cpu_native.amx_rows(), cpu_native.bf16_rows(), runner.native_prompt_rows
    amx_rows, bf16_rows = before[0], cpu_native.BF16_ROWS if cpu_native.bf16_available() else 0
    ways = {way: (amx_rows if amx is None else amx, bf16_rows if bf16 is None else bf16, wide, step)
            for way, (amx, bf16, wide, step) in WAYS.items() if (amx is not None or amx_rows)
            and (bf16 is not None or bf16_rows)}
    few_rows = quantized_linear.wide_products()[1] - 1  # the native step's prompt rows without bfloat16 products
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU "
          f"{'with' if 'amx_bf16' in cpu_native.cpu_flags() else 'without'} AMX; the engine's choice here: "
          f"{quantized_linear.many_rows()}", flush=True)
    real = quantized_linear.wide_products
    serial = [0]
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(-1, ns.rounds):  # round -1 warms each way and length, untimed
            for length in lengths:
                for way, (amx, bf16, wide, step) in ways.items():
                    cpu_native.set_amx_rows(amx)
                    cpu_native.set_bf16_rows(bf16)
                    quantized_linear.wide_products = lambda wide=wide: wide
                    runner.native_prompt_rows = None if step else few_rows
                    ms = prefill_ms(llm.engine, length, serial)
                    if r >= 0:
                        times.setdefault((way, length), []).append(ms)
            if r >= 0:
                print(f"round {r + 1}/{ns.rounds} done", flush=True)
    finally:
        quantized_linear.wide_products = real
        cpu_native.set_amx_rows(before[0])
        cpu_native.set_bf16_rows(before[1])
        runner.native_prompt_rows = before[2]
    for length in lengths:
        base = times[("tiles", length)]
        line = [f"prefill {length:5d} tokens: tiles {statistics.median(base):8.1f} ms"]
        for way in list(ways)[1:]:
            got = times[(way, length)]
            ratio = statistics.median(g / b for g, b in zip(got, base))
            line.append(f"{way} {statistics.median(got):8.1f} ms ({ratio:.2f}x)")
        print(";  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
