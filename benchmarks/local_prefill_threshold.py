"""Where should a decode worker prefill a prompt itself? Measures, per uncached prompt length:

- the probe's TTFT when prefilled remotely (threshold 0) and locally (threshold huge), and
- the stall it causes to another request that is decoding on the same decode worker
  (the largest gap between that stream's tokens while the probe is prefilled).

Local prefill saves the hop and the transfer but stalls decoding. The
recommended threshold is the longest length at which the local path is no
slower to first token and stalls decoding by at most half again its normal
gap; when there is none, one block (16 tokens).

    python benchmarks/local_prefill_threshold.py [--lengths 16,32,64,128,256,512] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.serving import Server  # noqa: E402
from tokenworks.bench.workloads import WORDS  # noqa: E402


async def probe(url: str, n_words: int, salt: int) -> tuple[float, float]:
    """(probe TTFT, largest ITL of a concurrent decoding stream during the probe)."""
    gaps: list[tuple[float, float]] = []
    started = asyncio.Event()

    async with httpx.AsyncClient(timeout=300) as client:
        async def background() -> None:
            body = {"prompt": f"bg{salt} once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True}
            last = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now
                        if len(gaps) >= 5:
                            started.set()
                        if stop.is_set():
                            return

        stop = asyncio.Event()
        bg = asyncio.create_task(background())
        await started.wait()
        prompt = f"p{salt} " + " ".join(WORDS[(salt * 13 + i) % len(WORDS)] for i in range(n_words))
        t0 = time.perf_counter()
        ttft = None
        async with client.stream("POST", url + "/v1/completions",
                                 json={"prompt": prompt, "max_tokens": 2, "stream": True, "ignore_eos": True}) as r:
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data:") and '"text"' in line:
                    ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        await asyncio.sleep(0.3)
        stop.set()
        bg.cancel()
        await asyncio.gather(bg, return_exceptions=True)
    stall = max((g for t, g in gaps if t0 <= t <= t1 + 0.3), default=0.0)
    return ttft or float("nan"), stall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16,32,64,128,256,512")
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args()
    lengths = [int(x) for x in ns.lengths.split(",")]
    rows = {}
    for mode, threshold in (("remote", "0"), ("local", "1000000")):
        s = Server("--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-threshold", threshold)
        try:
            for n in lengths:
                runs = [asyncio.run(probe(s.url, n, salt=1000 * n + r + (0 if mode == "remote" else 500)))
                        for r in range(ns.reps)]
                rows[(mode, n)] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                print(f"{mode:<7} {n:>5} words: TTFT {rows[(mode, n)][0] * 1e3:7.0f} ms, "
                      f"decode stall {rows[(mode, n)][1] * 1e3:6.0f} ms", flush=True)
        finally:
            s.stop()
    print(f"\n{'words':>6}{'remote TTFT':>13}{'local TTFT':>12}{'local stall':>13}{'remote stall':>14}")
    best = 0
    for n in lengths:
        rt, rs = rows[("remote", n)]
        lt, ls = rows[("local", n)]
        print(f"{n:>6}{rt * 1e3:>11.0f}ms{lt * 1e3:>10.0f}ms{ls * 1e3:>11.0f}ms{rs * 1e3:>12.0f}ms")
        if lt <= rt and ls <= 1.5 * rs:
            best = n
    print(f"\nrecommended --local-prefill-threshold: {best or 16} "
          f"({'measured' if best else 'no length where local prefill wins; one block'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
