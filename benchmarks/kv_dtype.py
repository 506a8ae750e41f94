"""Native CPU steps on one KV pool dtype against another, same model, same process, alternated over rounds.

Two engines of the default model, one with each pool (``--kv-cache-dtype``: float16, the CPU default, and int8, a
byte per value and a scale per head row); per case both write the same tokens' K/V into their own pool, then one
step is timed on each in turn, ``--rounds`` times. Cases: ``dB@C``, B decode rows each after C tokens of context
(the step's attention reads B x C tokens' K/V); ``pN@C``, a prompt chunk of N tokens after C cached ones (on AMX
machines attended on AMX tiles from 256 tokens of context). Prints each pool's median step and the median of the
rounds' ratios (this machine is shared: adjacent runs, not single times), and each pool's bytes per token.

    python benchmarks/kv_dtype.py [--cases d1@3500,d4@3500,d16@512,p512@2048,p32@4096,p512@0] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--dtypes", default="float16,int8", help="the baseline pool, then the other (default: float16,int8)")
    ap.add_argument("--cases", default="d1@3500,d4@3500,d16@512,p512@2048,p32@4096,p512@0",
                    help="dB@C: B decode rows after C tokens each; pN@C: a chunk of N tokens after C cached")
    ap.add_argument("--rounds", type=int, default=7, help="steps on each pool, alternated (default: 7)")
    ns = ap.parse_args()
    import torch

    from tokenworks import LLM, SamplingParams
    from tokenworks.engine.scheduler_output import ScheduledRequest

    base, other = ns.dtypes.split(",")
    runners = {}
    for name in (base, other):
        runner = LLM(model=ns.model, kv_cache_dtype=name).loaded.runner
        if runner.native is None:
            print(f"no native step on a {name} pool here (native kernels unavailable, or a layer not on them)")
            return 1
        runners[name] = runner
        print(f"{name} pool: {runner.kv.block_nbytes // runner.kv.block_size} bytes per token, "
              f"{runner.kv.num_blocks} blocks")
    params = SamplingParams(temperature=0)
    gen = torch.Generator().manual_seed(0)
    bs = runners[base].kv.block_size

    def write(runner, rid: str, ids: list[int], blocks: list[int]) -> None:
        for c0 in range(0, len(ids), 512):  # the context's K/V, in chunks as the scheduler would
            c1 = min(len(ids), c0 + 512)
            runner.forward_native([ScheduledRequest(rid, ids[c0:c1], c0, blocks, False, params, ids[:c1], [])])

    print(f"{'case':>10} | {base + ' ms':>12} | {other + ' ms':>12} | {other}/{base} (median of {ns.rounds} rounds)")
    for case in ns.cases.split(","):
        kind, (n, _, cached) = case[0], case[1:].partition("@")
        n, cached = int(n), int(cached or 0)
        rows = n if kind == "d" else 1
        seqs, next_block = [], 1
        for r in range(rows):
            ids = torch.randint(100, 20000, (cached + (1 if kind == "d" else n),), generator=gen).tolist()
            blocks = list(range(next_block, next_block + -(-len(ids) // bs)))
            next_block += len(blocks)
            seqs.append((f"r{r}", ids, blocks))
        if next_block > min(r.kv.num_blocks for r in runners.values()):
            print(f"{case:>10} | does not fit the pools")
            continue
        for runner in runners.values():
            for rid, ids, blocks in seqs:
                if cached:
                    write(runner, rid, ids[:cached], blocks)
        sched = [ScheduledRequest(rid, ids[cached:], cached, blocks, True, params, ids, []) for rid, ids, blocks in seqs]
        times = {name: [] for name in runners}
        for _ in range(ns.rounds):
            for name, runner in runners.items():
                t = time.perf_counter()
                runner.forward_native(sched)
                times[name].append(time.perf_counter() - t)
        ratio = statistics.median(o / b for o, b in zip(times[other], times[base]))
        print(f"{case:>10} | {statistics.median(times[base]) * 1e3:12.2f} | {statistics.median(times[other]) * 1e3:12.2f}"
              f" | {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
