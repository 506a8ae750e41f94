"""Decode steps of the default model at several batch sizes with their products of many rows taken each way this
machine has, alternated in one process: the native int16 tiles (the baseline), AVX512-BF16 dot products
(kernels.c: bf16_tile) and AMX tiles (amx.c), the last two in bfloat16. The engine takes AMX where it is, else
AVX512-BF16 where it is (``cpu_native.amx_rows``, ``cpu_native.bf16_rows``), from 4 rows.

Prints, per batch size, the median step time over the rounds and each way's ratio to the tiles (the median of the
rounds' ratios: this machine is shared; each round times the ways back to back).

    python benchmarks/batch_products.py [--batches 4,8,16,32] [--rounds 3] [--context 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def step_ms(engine, batch: int, context: int, steps: int, serial: list[int]) -> float:
    """The median time of a decode step of ``batch`` sequences of about ``context`` tokens."""
    from tokenworks import SamplingParams

    serial[0] += 1
    for i in range(batch):
        prompt = [(7 * serial[0] + 13 * j + 101 * i) % 40000 + 100 for j in range(context)]  # never a cache hit
        engine.add_request(f"b{serial[0]}-{i}", prompt,
                           SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[-steps:]) * 1e3  # the prefills' steps left out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="4,8,16,32", help="batch sizes (sequences decoding at once)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=128, help="tokens of context per sequence")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per batch and way")
    ns = ap.parse_args()
    import torch

    from tokenworks import LLM
    from tokenworks.model import cpu_native

    batches = [int(b) for b in ns.batches.split(",")]
    llm = LLM(max_model_len=ns.context + ns.steps + 16, max_num_seqs=max(batches))
    if cpu_native.library() is None:
        print(f"the native kernels are unavailable here ({cpu_native.unavailable_reason()}): nothing to compare")
        return 1
    amx, bf16 = cpu_native.amx_rows(), cpu_native.bf16_rows()
    ways = {"int16 tiles": (0, 0)}
    if cpu_native.bf16_available():
        ways["avx512-bf16"] = (0, 4)
    if amx:
        ways["amx"] = (amx, 0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the engine's way here from 4 rows: "
          f"{'amx' if amx else 'avx512-bf16' if bf16 else 'int16 tiles'}; {ns.context} tokens of context", flush=True)
    if len(ways) == 1:
        print("this machine has no bfloat16 way (neither AVX512-BF16 nor AMX): nothing to compare")
        return 1
    serial, times = [0], {}
    try:
        for r in range(-1, ns.rounds):  # round -1 warms each way and batch, untimed
            for batch in batches:
                for way, (amx_rows, bf16_rows) in ways.items():
                    cpu_native.set_amx_rows(amx_rows)
                    cpu_native.set_bf16_rows(bf16_rows)
                    ms = step_ms(llm.engine, batch, ns.context, ns.steps, serial)
                    if r >= 0:
                        times.setdefault((way, batch), []).append(ms)
            if r >= 0:
                print(f"round {r + 1}/{ns.rounds} done", flush=True)
    finally:
        cpu_native.set_amx_rows(amx)
        cpu_native.set_bf16_rows(bf16)
    for batch in batches:
        base = times[("int16 tiles", batch)]
        line = [f"decode batch {batch:3d}: int16 tiles {statistics.median(base):7.2f} ms"]
        for way in list(ways)[1:]:
            got = times[(way, batch)]
            ratio = statistics.median(g / b for g, b in zip(got, base))
            line.append(f"{way} {statistics.median(got):7.2f} ms ({ratio:.2f}x)")
        print(";  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
