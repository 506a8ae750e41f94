"""Simulator fidelity: the real server and `tokenworks simulate` on the same seeded workloads.

1. Profiles (unless given): `tokenworks profile` on one core (the worker of a split
   layout) and on all cores (the aggregated worker), thorough mode.
2. For each layout and rate: the real server (`tokenworks serve`) is driven by the
   bench load generator with a seeded workload, fresh prompts at each rate (nothing
   one rate sends is cached for the next), ignore_eos; the simulator runs the same
   requests (prompt lengths from the server's tokenizer) at the same arrival times.
   --workload mixed (default): 85 % short prompts, 15 % long ones, outputs of 32-96
   tokens, nothing shared. --workload shared-prefix: questions of 20-200 tokens after
   one of 4 system prompts of 512, outputs of 32-96; the prefix cache is modelled
   from the blocks the workload states.
3. Printed: measured vs simulated median and p90 TTFT and TPOT per run, the error
   of each, and each layout's goodput measured and simulated.

The profile times the engine alone; the serving stack (HTTP, router, ZMQ messages,
the router and load generator sharing the two cores) costs more. Before each
layout's runs, 6 requests sent one at a time (fixed 40-word prompts, 24 tokens)
measure that excess against the simulator's prediction for the same requests: a
per-step cost (from TPOT) and a per-delivery one (from TTFT), which the simulator
then adds (`Deployment.step_overhead_s`, `overhead_s`; `tokenworks simulate
--step-overhead-ms --overhead-ms`). The errors without them are printed too.

Layouts (2 CPUs): aggregated (1 worker on both cores), disaggregated (1 prefill on
CPU 0 + 1 decode on CPU 1, NIXL) and mixed (1 prefill worker + 1 aggregated worker,
local prefill up to 128 tokens: short prompts stay on the aggregated worker).

    python benchmarks/sim_fidelity.py [--profile-1core P] [--profile-all P] [--rates 1,2,4]
                                      [--num-requests 40] [--workload mixed|shared-prefix]
                                      [--out results/sim-fidelity]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LAYOUTS = {
    "aggregated": (["--aggregated-workers", "1"], [("both", 1, "all")], 16),
    "disaggregated": (["--prefill-workers", "1", "--decode-workers", "1"], [("prefill", 1, "one"), ("decode", 1, "one")], 16),
    "mixed": (["--prefill-workers", "1", "--aggregated-workers", "1", "--local-prefill-threshold", "128"],
              [("prefill", 1, "one"), ("both", 1, "one")], 128),
}


CALIBRATION = 6
BURST = 8


def calibrate(url: str, dep, tok):
    """The serving stack's own cost (HTTP, router, messages), which `tokenworks profile` does not see,
    measured against the simulator predicting the same probe requests (fixed 40-word prompts, 24 tokens):
    first one at a time (a per-step cost from TPOT, then a per-delivery one from TTFT), then 8 at once
    (a per-request-in-the-step cost from the TPOT left over). The comparison workload plays no part."""
    import statistics
    from dataclasses import replace

    from tokenworks.bench import workloads as W
    from tokenworks.bench.loadgen import Load, arrival_times, run_load
    from tokenworks.planner.simulator import SimWorkload, simulate

    reqs = W.synthetic(CALIBRATION + 1, "fixed:40", "fixed:24", seed=999)
    sent, _ = asyncio.run(run_load(url, reqs, Load(concurrency=1), timeout=300))
    results = [r for r in sent[1:] if r.ok]  # the first warms up
    if not results:
        raise RuntimeError("calibration requests failed: " + "; ".join({str(r.error) for r in sent}))
    work = SimWorkload([100.0 * i for i in range(len(results))], [r.prompt_tokens for r in results],
                       [r.output_tokens for r in results])
    alone = simulate(dep, work)
    step = max(0.0, statistics.median(r.tpot for r in results) - float(np.nanmedian(alone.tpot)))
    dep = replace(dep, step_overhead_s=step)
    alone = simulate(dep, work)
    first = max(0.0, statistics.median(r.ttft for r in results) - float(np.median(alone.ttft)))
    dep = replace(dep, overhead_s=first)
    burst = W.synthetic(BURST, "fixed:40", "fixed:24", seed=998)
    results, _ = asyncio.run(run_load(url, burst, Load(rate=1000.0, seed=5), timeout=300))
    ok = [r for r in results if r.ok]
    if ok:
        times = arrival_times(len(burst), 1000.0, 1.0, 5)
        work = SimWorkload([times[r.index] for r in ok], [r.prompt_tokens for r in ok], [r.output_tokens for r in ok])
        together = simulate(dep, work)
        extra = statistics.median(r.tpot for r in ok) - float(np.nanmedian(together.tpot))
        dep = replace(dep, token_overhead_s=max(0.0, extra / BURST))
    return dep


def figures(measured: dict, simulated: dict) -> list[tuple[float, float | None, float | None]]:
    """(real, simulated, relative error) of median and p90 TTFT, then median and p90 TPOT."""
    out = []
    for key in ("ttft_s", "tpot_s"):
        for q in ("median", "p90"):
            a, b = measured[key][q], simulated[key][q]
            out.append((a, b, None if not a or b is None else b / a - 1))
    return out


def with_served_pools(server, dep):
    """``dep`` with each pool's KV capacity the least the server's workers report (blocks x block size)."""
    from dataclasses import replace

    blocks = int(min(server.metric("tokenworks:worker_kv_blocks_total", f'worker="{w}"') for w in server.workers()))
    pools = tuple(replace(p, profile=replace(p.profile, kv_capacity_tokens=blocks * p.profile.block_size))
                  for p in dep.pools)
    print(f"[fidelity] KV pools as served: {blocks} blocks of {pools[0].profile.block_size} tokens",
          file=sys.stderr, flush=True)
    return replace(dep, pools=pools)


def with_host_tier(dep, gib: float):
    """``dep`` with a host tier of ``gib`` behind every worker's pool, sized in whole blocks as the worker's is."""
    from dataclasses import replace

    from tokenworks.planner.simulator import host_tier_tokens

    return replace(dep, pools=tuple(replace(p, host_kv_tokens=host_tier_tokens(p.profile, gib)) for p in dep.pools))


def spread(errors: list[float]) -> str:
    """Median, max and share within 10 % of absolute errors."""
    errors = sorted(errors)
    within = sum(1 for e in errors if e <= 0.10) / len(errors)
    return f"median {errors[len(errors) // 2]:.1%}, max {errors[-1]:.1%}; {within:.0%} within 10 %"


def profile(out: str, cpus: str | None) -> str:
    cmd = [sys.executable, "-m", "tokenworks.cli", "profile", "--out", out] + (["--cpus", cpus] if cpus else [])
    print(f"[fidelity] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-1core", default=None, help="profile of a worker on one core (default: measure it)")
    ap.add_argument("--profile-all", default=None, help="profile of a worker on all cores (default: measure it)")
    ap.add_argument("--rates", default="1,2,4", help="request rates, per second (default: 1,2,4, for this CPU)")
    ap.add_argument("--num-requests", type=int, default=40, help="requests per rate (default: 40)")
    ap.add_argument("--workload", choices=["mixed", "shared-prefix"], default="mixed",
                    help="mixed: nothing shared; shared-prefix: 4 system prompts of 512 tokens (default: mixed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--slo-ttft-ms", type=float, default=8000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--out", default="results/sim-fidelity")
    ap.add_argument("--model", default=None, help="model to serve and tokenize with (default: the built-in one)")
    ap.add_argument("--serve-flags", default="", help="extra flags for every server, e.g. '--gpus 0 --device cuda'")
    ap.add_argument("--kv-cache-memory-gib", type=float, default=None, metavar="GIB",
                    help="each worker's KV pool (default: the server's); the simulated pools are set to the blocks "
                         "the workers report, e.g. 0.02 to see the prefix cache crowded by running requests")
    ap.add_argument("--kv-host-memory-gib", type=float, default=0.0, metavar="GIB",
                    help="a host-memory KV tier per worker, served and simulated (default: none)")
    ap.add_argument("--warmup", type=int, default=0, metavar="N",
                    help="first send N unmeasured requests of the same kind (fresh prompts), e.g. to warm a GPU")
    args = ap.parse_args()

    from tests.serving import Server
    from tokenworks.bench import workloads as W
    from tokenworks.bench.loadgen import Load, arrival_times, run_load
    from tokenworks.bench.metrics import SLO, goodput, summarize
    from tokenworks.model.weights import load_tokenizer_files
    from tokenworks.planner.profile import Profile
    from tokenworks.planner.simulator import Deployment, Pool, SimWorkload, simulate, summarize_sim
    from tokenworks.tokenizer import Tokenizer

    os.makedirs(args.out, exist_ok=True)
    one = Profile.load(args.profile_1core or profile(os.path.join(args.out, "profile-1core.json"), "0"))
    every = Profile.load(args.profile_all or profile(os.path.join(args.out, "profile-all.json"), None))
    profiles = {"one": one, "all": every}
    files = load_tokenizer_files(args.model)
    tok = Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)
    # Fresh prompts at every rate (seed + k): one rate's prompts are not in the server's prefix cache for the next.
    rates = [float(r) for r in args.rates.split(",")]

    def make(n: int, seed: int) -> list:
        if args.workload == "shared-prefix":
            return W.shared_prefix(n, 4, 512, "uniform:20:200", "uniform:32:96", seed)
        return W.mixed(n, seed)

    workloads = [make(args.num_requests, args.seed + k) for k in range(len(rates))]
    lengths = [([len(tok.encode(r.prompt)) for r in reqs], [r.max_tokens for r in reqs]) for reqs in workloads]
    blocks = [W.shared_blocks(reqs) or (None, 0) for reqs in workloads]  # (ids per request, tokens a block)
    slo = SLO(ttft=args.slo_ttft_ms / 1000, tpot=args.slo_tpot_ms / 1000)
    raw_errors: list[float] = []
    rows, doc = [], {"slo": slo.describe(), "rates": rates, "num_requests": args.num_requests, "layouts": {}}
    for name in args.layouts.split(","):
        flags, pools, threshold = LAYOUTS[name]
        dep = Deployment(tuple(Pool(role, n, profiles[which]) for role, n, which in pools),
                         local_prefill_threshold=threshold)
        pool_flags = ["--kv-cache-memory-gib", str(args.kv_cache_memory_gib)] if args.kv_cache_memory_gib else []
        if args.kv_host_memory_gib:
            pool_flags += ["--kv-host-memory-gib", str(args.kv_host_memory_gib)]
            dep = with_host_tier(dep, args.kv_host_memory_gib)
        server = Server(*flags, *(["--model", args.model] if args.model else []), *pool_flags,
                        *args.serve_flags.split())
        measured, simulated, raw = [], [], []
        try:
            if args.kv_cache_memory_gib:
                dep = with_served_pools(server, dep)
            if args.warmup:
                t0 = time.perf_counter()
                asyncio.run(run_load(server.url, make(args.warmup, args.seed + 1000), Load(rate=rates[-1], seed=1),
                                     timeout=600))
                print(f"[fidelity] {name}: {args.warmup} warm-up requests in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
                server.wait_idle(30)
            dep_raw = dep
            dep = calibrate(server.url, dep, tok)
            print(f"[fidelity] {name}: serving overhead measured with {CALIBRATION} sequential and {BURST} "
                  f"simultaneous requests: {dep.overhead_s * 1e3:.1f} ms per delivery, "
                  f"{dep.step_overhead_s * 1e3:.1f} ms per step, {dep.token_overhead_s * 1e3:.2f} ms per request "
                  "in a step", file=sys.stderr, flush=True)
            for rate, requests, (prompt_len, output_len), (ids, bt) in zip(rates, workloads, lengths, blocks):
                load = Load(rate=rate, seed=args.seed)
                t0 = time.perf_counter()
                cached_before = server.metric("tokenworks:prompt_tokens_cached_total")
                results, wall = asyncio.run(run_load(server.url, requests, load, timeout=600))
                cached_real = server.metric("tokenworks:prompt_tokens_cached_total") - cached_before
                m = summarize(results, wall, slo)
                if [r.prompt_tokens for r in results if r.ok] != [p for p, r in zip(prompt_len, results) if r.ok]:
                    print("[fidelity] warning: the server counted other prompt lengths than the tokenizer here",
                          file=sys.stderr)
                times = arrival_times(len(requests), rate, 1.0, args.seed)
                work = SimWorkload(times, prompt_len, output_len, ids, bt)
                sim = simulate(dep, work)
                s = summarize_sim(sim, slo)
                raw.append((rate, summarize_sim(simulate(dep_raw, work), slo)))
                measured.append((rate, m))
                simulated.append((rate, s))
                print(f"[fidelity] {name} @ {rate:g} req/s: measured in {time.perf_counter() - t0:.0f} s; "
                      f"{m['completed']}/{m['requests']} done; prompt tokens cached: real {cached_real:,.0f}, "
                      f"simulated {sim.stats['cached_prompt_tokens']:,} of {sum(prompt_len):,}", file=sys.stderr,
                      flush=True)
                server.wait_idle(30)
        finally:
            server.stop()
        gp_m = goodput(measured, 0.9)
        gp_s = goodput(simulated, 0.9)
        doc["layouts"][name] = {"measured": [m for _, m in measured], "simulated": [s for _, s in simulated],
                                "simulated_without_overheads": [s for _, s in raw],
                                "overhead_s": dep.overhead_s, "step_overhead_s": dep.step_overhead_s,
                                "token_overhead_s": dep.token_overhead_s,
                                "goodput_measured": gp_m, "goodput_simulated": gp_s, "deployment": dep.describe()}
        for (_, m), (_, s) in zip(measured, raw):
            raw_errors.extend(abs(e) for _, _, e in figures(m, s) if e is not None)
        for (rate, m), (_, s) in zip(measured, simulated):
            rows.append([name, rate, *figures(m, s), (m["slo_attainment"], s["slo_attainment"])])
        rows.append([name, "goodput", gp_m, gp_s])
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(doc, f, indent=2)

    print(f"\nsimulated vs measured, {args.num_requests} {args.workload} requests per rate (seed {args.seed}); "
          f"profiles: 1 core {one.date[:16]}, all cores {every.date[:16]}; SLO {slo.describe()}")
    print(f"{'layout':<14}{'rate':>6} | {'TTFT median ms':^24} | {'TTFT p90 ms':^24} | {'TPOT median ms':^22} | "
          f"{'TPOT p90 ms':^22} | SLO met")
    print(f"{'':<14}{'':>6} | {'real':>7}{'sim':>7}{'err':>8}   | {'real':>7}{'sim':>7}{'err':>8}   | "
          f"{'real':>6}{'sim':>6}{'err':>8}   | {'real':>6}{'sim':>6}{'err':>8}   | real / sim")
    errors = []
    for row in rows:
        if row[1] == "goodput":
            fmt = lambda v: "none" if v is None else f"{v:g} req/s"  # noqa: E731
            print(f"{row[0]:<14} goodput: real {fmt(row[2])}, simulated {fmt(row[3])}")
            continue
        line = f"{row[0]:<14}{row[1]:>6g} |"
        for k, (a, b, e) in enumerate(row[2:6]):
            w = 7 if k < 2 else 6
            line += f" {a * 1000:>{w}.0f}{b * 1000:>{w}.0f}{e:>+8.1%}   |" if e is not None else " -   |"
            if e is not None:
                errors.append(abs(e))
        line += f" {row[6][0]:.0%} / {row[6][1]:.0%}"
        print(line)
    if errors:
        print(f"\n|error| over {len(errors)} figures: {spread(errors)}")
    if raw_errors:
        print(f"without the measured serving overheads: {spread(raw_errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
