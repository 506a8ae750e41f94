"""The default model's decode step with its GGUF 4-bit layers run as 4-bit vs dequantized to float32, same run.

Prints the median decode step (ms) at each batch size for ``--quantization none`` and ``auto``, two passes
each (the better one kept: this machine is shared), and the ratio float32 / 4-bit.

    python benchmarks/quantized.py [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import median_time  # noqa: E402


def step_ms(llm, batch: int, steps: int = 12) -> float:
    from tokenworks import SamplingParams

    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True)
    for i in range(batch):
        e.add_request(f"b{batch}-{i}-{time.time_ns()}", [(i * 31 + j) % 900 + 1 for j in range(40)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in e.scheduler.requests.values()):
        e.step()
    ms = median_time(e.step, steps, warmup=0) * 1e3
    for rid in list(e.scheduler.requests):
        e.abort(rid)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file with Q4_0/Q4_1 layers (default: the built-in model)")
    ap.add_argument("--batches", default="1,8,32")
    ns = ap.parse_args()
    from tokenworks import LLM

    batches = [int(b) for b in ns.batches.split(",")]
    best: dict[tuple[str, int], float] = {}
    for mode in ("none", "auto", "none", "auto"):
        llm = LLM(model=ns.model, quantization=mode)
        for b in batches:
            ms = step_ms(llm, b)
            best[(mode, b)] = min(ms, best.get((mode, b), float("inf")))
    for b in batches:
        f, q = best[("none", b)], best[("auto", b)]
        print(f"batch {b:>3}: float32 {f:7.1f} ms   4-bit {q:7.1f} ms   float32 / 4-bit {f / q:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
