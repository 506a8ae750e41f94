"""Routing benchmark: the KV-aware cost against least-loaded, round-robin and a prefix-only oracle, same run.

For each routing (``tokenworks serve --routing``) a fresh server with two
aggregated workers, each KV pool smaller than the workload's working set, runs
the same seeded workloads through the real HTTP API:

  - multi-turn: conversations whose turns resend the history (sessions
    arriving over time, the workload's own timing);
  - shared-prefix: system prompts shared by many requests (open loop).

Prints TTFT p50/p90, the prefix hit rate (cached / prompt tokens, from the
server's own counters) and the ratios to least-loaded routing and to the
prefix-only oracle ("prefix": the longest hit wins whatever the load, the
most hits an exact index can give).

    python benchmarks/routing.py [--kv-cache-memory-gib 0.05] [--json out.json]
    python benchmarks/routing.py --routings kv,kv+host      # the host-memory KV tier's effect
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.serving import Server  # noqa: E402
from tokenworks.bench.loadgen import Load, run_load  # noqa: E402
from tokenworks.bench.metrics import stats  # noqa: E402
from tokenworks.bench.workloads import multi_turn, shared_prefix  # noqa: E402

ROUTINGS = ("kv", "prefix", "least-loaded", "round-robin")


COUNTERS = ("tokenworks:prompt_tokens_total", "tokenworks:prompt_tokens_cached_total")


def workloads(seed: int) -> dict[str, tuple[list, Load]]:
    """Sized for a 2-core machine (one core a worker) to run below its capacity when prefixes are reused."""
    return {
        "multi-turn": (multi_turn(48, turns=4, session_rate=0.3, think_time=4.0, num_prefixes=4, prefix_len=192,
                                  user_len="uniform:20:40", output_len="fixed:16", seed=seed), Load()),
        "shared-prefix": (shared_prefix(40, num_prefixes=6, prefix_len=320, suffix_len="uniform:10:30",
                                        output_len="fixed:16", seed=seed), Load(rate=0.8, seed=seed)),
    }


def run(routing: str, kv_gib: float, seed: int, host_gib: float) -> dict[str, dict]:
    """``routing`` as ``serve --routing`` takes it; "+host" appended: with the host-memory KV tier as well."""
    policy, _, host = routing.partition("+")
    extra = ["--kv-host-memory-gib", str(host_gib)] if host else []
    server = Server("--aggregated-workers", "2", "--routing", policy, "--kv-cache-memory-gib", str(kv_gib),
                    "--max-queue-wait", "120", *extra)
    out = {}
    try:
        for name, (requests, load) in workloads(seed).items():
            before = {c: server.metric(c) for c in COUNTERS}
            t = time.perf_counter()
            results, wall = asyncio.run(run_load(server.url, requests, load, timeout=180))
            after = {c: server.metric(c) for c in COUNTERS}
            ok = [r for r in results if r.ok]
            prompt = after["tokenworks:prompt_tokens_total"] - before["tokenworks:prompt_tokens_total"]
            cached = after["tokenworks:prompt_tokens_cached_total"] - before["tokenworks:prompt_tokens_cached_total"]
            ttft = stats([r.ttft for r in ok])
            errors = sorted({(r.error or "")[:40] for r in results if not r.ok})
            out[name] = {"errors": errors, "completed": len(ok), "requests": len(results), "ttft_p50": ttft["median"],
                         "ttft_p90": ttft["p90"], "hit_rate": cached / prompt if prompt else 0.0, "wall": wall}
            print(f"{routing:<13} {name:<14} {len(ok)}/{len(results)} done  TTFT p50 {ttft['median'] * 1e3:7.0f} ms  "
                  f"p90 {ttft['p90'] * 1e3:7.0f} ms  hit rate {out[name]['hit_rate']:.2f}  "
                  f"({time.perf_counter() - t:.0f} s){' errors: ' + '; '.join(errors) if errors else ''}", flush=True)
            server.wait_idle(60)
    finally:
        server.stop()
    return out


def plot(results: dict[str, dict[str, dict]], path: str) -> None:
    """TTFT p50 and prefix hit rate per routing, one group per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values())))
    routings = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(routings)
    for k, routing in enumerate(routings):
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [results[routing][n]["ttft_p50"] for n in names], width, label=routing)
        axes[1].bar(xs, [results[routing][n]["hit_rate"] for n in names], width, label=routing)
    for ax, title in zip(axes, ("TTFT p50 (s), lower is better", "prefix hit rate, higher is better")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_title(title)
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(routings))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-memory-gib", type=float, default=0.05,
                    help="each worker's KV pool (default 0.05 GiB: about 1,160 tokens of the default model, less "
                         "than either workload's working set, which two pools can about hold)")
    ap.add_argument("--routings", default=",".join(ROUTINGS),
                    help="routings to compare; NAME+host adds the host-memory KV tier (e.g. kv,kv+host)")
    ap.add_argument("--kv-host-memory-gib", type=float, default=0.5, help="the host tier of the +host runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, metavar="PNG", help="also draw TTFT and hit rate per routing")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from an earlier --json")
    ns = ap.parse_args()
    if ns.replot:
        with open(ns.replot) as f:
            plot(json.load(f), ns.plot or "routing.png")
        return 0
    results = {r: run(r, ns.kv_cache_memory_gib, ns.seed, ns.kv_host_memory_gib) for r in ns.routings.split(",")}
    print(f"\n{'workload':<14} {'routing':<13} {'TTFT p50':>9} {'vs least-loaded':>16} {'hit rate':>9} {'vs oracle':>10}")
    for name in next(iter(results.values())):
        base = results.get("least-loaded", {}).get(name)
        oracle = results.get("prefix", {}).get(name)
        for routing, res in results.items():
            r = res[name]
            vs_ll = f"{r['ttft_p50'] / base['ttft_p50']:.2f}x" if base else "-"
            vs_or = f"{r['hit_rate'] / oracle['hit_rate']:.2f}x" if oracle and oracle["hit_rate"] else "-"
            print(f"{name:<14} {routing:<13} {r['ttft_p50'] * 1e3:7.0f}ms {vs_ll:>16} {r['hit_rate']:9.2f} {vs_or:>10}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)
    if ns.plot:
        plot(results, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
