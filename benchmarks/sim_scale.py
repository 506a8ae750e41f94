"""Simulator scale: 1,000 workers and one hour of traffic at 1,000 requests/s.

The fleet: 300 prefill + 700 decode workers with the profile given (default: the
Llama-3.1-8B-shaped profile measured on an H200, docs/profiles/h200-llama-3.1-8b.json),
Poisson arrivals, prompts uniform 50-1000 tokens, outputs uniform 16-256.
Printed: wall time, events per second, simulated requests per second of wall time,
and the latency summary. Baseline in the same run: one minute of the same traffic
simulated step by step (no closed-form decode jumps), against the same minute with them.

With --system-prompts N, the same minute is simulated again with prefix caching: each
prompt starts with one of N system prompts of 512 tokens (its blocks of 16 tokens shared),
the rest its own; printed against the minute without blocks, in the same run.

    python benchmarks/sim_scale.py [--profile P] [--seconds 3600] [--rate 1000] [--system-prompts 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="docs/profiles/h200-llama-3.1-8b.json")
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--prefill", type=int, default=300)
    ap.add_argument("--decode", type=int, default=700)
    ap.add_argument("--shards", type=int, default=os.cpu_count() or 1,
                    help="parallel processes, each a share of the fleet and of the traffic (default: all CPUs)")
    ap.add_argument("--system-prompts", type=int, default=0, metavar="N",
                    help="also simulate the first minute with prefix caching, prompts starting with one of N system "
                         "prompts of 512 tokens (default: 0, not run)")
    args = ap.parse_args()

    from tokenworks.bench.metrics import SLO
    from tokenworks.planner.profile import Profile
    from tokenworks.planner.simulator import Deployment, Pool, SimWorkload, simulate, summarize_sim

    prof = Profile.load(args.profile)
    dep = Deployment((Pool("prefill", args.prefill, prof, 3.79), Pool("decode", args.decode, prof, 3.79)))
    rng = np.random.default_rng(0)
    n = int(args.seconds * args.rate)
    t = time.perf_counter()
    arrival = np.cumsum(rng.exponential(1.0 / args.rate, n))
    work = SimWorkload(arrival, rng.integers(50, 1001, n), rng.integers(16, 257, n))
    print(f"workload: {n:,} requests over {arrival[-1]:.0f} s, made in {time.perf_counter() - t:.1f} s; "
          f"fleet: {dep.describe()} ({dep.num_workers} workers)", flush=True)

    minute = int(min(n, 60 * args.rate))
    head = SimWorkload(arrival[:minute], work.prompt_len[:minute], work.output_len[:minute])
    fast = simulate(dep, head)
    slow = simulate(dep, head, max_jump=1)
    same = np.allclose(fast.e2e, slow.e2e, rtol=1e-9, atol=1e-9)
    print(f"one minute ({minute:,} requests): step by step {slow.wall_s:.2f} s ({slow.events:,} events), "
          f"closed-form jumps {fast.wall_s:.2f} s ({fast.events:,} events): {slow.wall_s / fast.wall_s:.1f}x faster, "
          f"results {'identical' if same else 'DIFFERENT'}", flush=True)
    if args.system_prompts:
        # ids: a system prompt's 32 blocks, then blocks of this request's own (ids no other request has)
        first = rng.integers(0, args.system_prompts, minute).tolist()
        plen = head.prompt_len + 512
        blocks = [tuple(range(s * 32, s * 32 + 32)) + tuple(range(10**7 + i * 64, 10**7 + i * 64 + (p - 512) // 16))
                  for i, (s, p) in enumerate(zip(first, plen.tolist()))]
        plain = simulate(dep, SimWorkload(head.arrival, plen, head.output_len))
        cached = simulate(dep, SimWorkload(head.arrival, plen, head.output_len, blocks, 16))
        share = cached.stats["cached_prompt_tokens"] / float(plen.sum())
        print(f"one minute with {args.system_prompts} system prompts of 512 tokens: prefix caching modelled "
              f"{cached.wall_s:.2f} s, without blocks {plain.wall_s:.2f} s ({cached.wall_s / plain.wall_s:.1f}x); "
              f"{share:.0%} of prompt tokens cached; TTFT median {np.nanmedian(cached.ttft) * 1e3:.0f} ms against "
              f"{np.nanmedian(plain.ttft) * 1e3:.0f} ms uncached", flush=True)

    result = simulate(dep, work, shards=args.shards)
    s = summarize_sim(result, SLO(ttft=1.0, tpot=0.05), dep.price_per_hour)
    print(f"\nfull run in {args.shards} shard(s): {n:,} requests, {result.events:,} events in {result.wall_s:.1f} s of wall time = "
          f"{result.events / result.wall_s:,.0f} events/s, {n / result.wall_s:,.0f} requests/s "
          f"({'under' if result.wall_s < 60 else 'OVER'} the 60 s target)")
    print(f"simulated {s['duration_s']:.0f} s: TTFT median {s['ttft_s']['median'] * 1e3:.0f} ms p90 "
          f"{s['ttft_s']['p90'] * 1e3:.0f} ms; TPOT median {s['tpot_s']['median'] * 1e3:.1f} ms p90 "
          f"{s['tpot_s']['p90'] * 1e3:.1f} ms; {s['slo_attainment']:.1%} within TTFT 1 s and TPOT 50 ms; "
          f"${s['cost_per_million_output_tokens']:.3f} per million output tokens; "
          f"{result.stats['kv_bytes'] / 1e15:.2f} PB of KV moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
