"""A decode step of mixed context lengths: attention in groups of similar length vs one batch padded to the longest.

The batches: 32 short requests; one long request alone; the long one plus 31 short ones. For each, the
median decode step (ms) with the runner's grouping and with every decode padded to the longest context
(one group), alternating in the same run. With grouping the mixed step should cost about the short batch
plus the long request; padded, it pays for 32 long contexts.

    python benchmarks/mixed_decode.py [--long 4096] [--short 64] [--device cpu]
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long", type=int, default=4096, help="context of the long request (default: 4096)")
    ap.add_argument("--short", type=int, default=64, help="context of each short request (default: 64)")
    ap.add_argument("--steps", type=int, default=6, help="decode steps timed per case and mode (default: 6)")
    ns = ap.parse_args()

    import torch

    from tokenworks import LLM, SamplingParams

    llm = LLM(model=ns.model, device=ns.device, max_model_len=ns.long + 4 * ns.steps + 8)
    engine, runner = llm.engine, llm.loaded.runner
    sync = torch.cuda.synchronize if ns.device.startswith("cuda") else (lambda: None)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    cases = {"32 short": [ns.short] * 32, "1 long": [ns.long], "1 long + 31 short": [ns.long] + [ns.short] * 31}
    results = {}
    for name, lengths in cases.items():
        for i, n in enumerate(lengths):
            engine.add_request(f"{name}-{i}", [(13 * i + j) % 1000 + 1 for j in range(n)], params)
        while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
            engine.step()
        times = {"grouped": [], "padded": []}
        for _ in range(ns.steps):
            for mode, overhead in (("grouped", None), ("padded", 10**9)):
                saved = runner.group_overhead
                if overhead is not None:
                    runner.group_overhead = overhead
                sync()
                t = time.perf_counter()
                engine.step()
                sync()
                times[mode].append(time.perf_counter() - t)
                runner.group_overhead = saved
        results[name] = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        for r in list(engine.scheduler.requests):
            engine.abort(r)
        print(f"{name:<20} ({sum(lengths):>6} context tokens): grouped {results[name]['grouped']:7.1f} ms   "
              f"padded {results[name]['padded']:7.1f} ms   padded/grouped "
              f"{results[name]['padded'] / results[name]['grouped']:.2f}", flush=True)
    short, long_, mixed = (results[k]["grouped"] for k in cases)
    print(f"mixed step / (short batch + long alone - one short's share): "
          f"{mixed / (short + long_ - short / 32):.2f} (1.0 = cost follows the sum of contexts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
