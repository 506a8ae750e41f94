"""The serving path against the engine it serves, same machine, same model, same run.

For each concurrency C: the offline engine (``LLM.generate`` on C prompts at once) and one aggregated
server worker (same device and threads) under a closed loop of C streams with the same prompts and output
lengths (``ignore_eos``); prints output tokens/s of both and served/offline. Then one stream: the served
inter-token gap (median) against the engine's batch-1 decode step. And the router process's CPU time per
delivered token (user + system, from /proc), the cost of the HTTP/SSE path itself, beside its floor: a bare ASGI
app on the same uvicorn streaming one fixed event per stream per step to the same client (``bare_sse.py``).

    python benchmarks/serving_path.py [--model PATH] [--concurrency 1,16,64] [--output-len 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline(model: str | None, device: str, prompts: list[str], output_len: int, concurrency: list[int]) -> dict:
    from tokenworks import LLM, SamplingParams

    llm = LLM(model=model, device=device)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], params)  # first-time costs
    out = {}
    for c in concurrency:
        t = time.perf_counter()
        res = llm.generate(prompts[:c], params)
        wall = time.perf_counter() - t
        out[c] = sum(len(r.token_ids) for r in res) / wall
    # The batch-1 decode step: one request, time per step after its prefill.
    engine = llm.engine
    engine.add_request("step-probe", prompts[0], SamplingParams(temperature=0, max_tokens=output_len + 1,
                                                                ignore_eos=True))
    engine.step()
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    out["step_s"] = statistics.median(steps)
    return out


def served(model: str | None, device: str, prompts: list[str], output_len: int, concurrency: list[int],
           flags: list[str]) -> dict:
    from tests.serving import Server
    from tokenworks.bench.loadgen import Load, run_load
    from tokenworks.bench.metrics import SLO, summarize
    from tokenworks.bench.workloads import BenchRequest

    model_flags = ["--model", model] if model else []
    server = Server("--aggregated-workers", "1", "--device", device, *model_flags, *flags, startup_timeout=300)
    out = {}
    try:
        warm = [BenchRequest(p, output_len, input_tokens=0) for p in prompts[:2]]
        asyncio.run(run_load(server.url, warm, Load(concurrency=2)))
        for c in concurrency:
            reqs = [BenchRequest(p, output_len, input_tokens=0) for p in prompts[:c]]
            cpu0 = cpu_seconds(server.proc.pid)
            results, wall = asyncio.run(run_load(server.url, reqs, Load(concurrency=c), timeout=600))
            cpu = cpu_seconds(server.proc.pid) - cpu0
            s = summarize(results, wall, SLO())
            out[c] = {"tokens_s": s["output_token_throughput"], "itl_median_s": s["itl_s"]["median"],
                      "router_us_per_token": cpu / max(1, s["output_tokens"]) * 1e6, "failed": s["failed"]}
    finally:
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated stream counts (default: 1,16,64)")
    ap.add_argument("--output-len", type=int, default=32, help="tokens per request (default: 32)")
    ap.add_argument("--serve-flags", default="", help="extra flags for the server")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ns = ap.parse_args()
    from tokenworks.bench.workloads import synthetic

    concurrency = [int(c) for c in ns.concurrency.split(",")]
    prompts = [r.prompt for r in synthetic(max(concurrency) + 2, "uniform:20:60", "fixed:1", seed=3)]
    off = offline(ns.model, ns.device, prompts, ns.output_len, concurrency)
    srv = served(ns.model, ns.device, prompts, ns.output_len, concurrency, ns.serve_flags.split())
    from benchmarks.bare_sse import measure

    floor = {c: measure(c, ns.output_len, step=0.02) for c in concurrency}
    print(f"{'streams':>7} | offline tok/s | served tok/s | served/offline | router CPU us/token | bare uvicorn floor"
          " | router/floor")
    for c in concurrency:
        s = srv[c]
        print(f"{c:>7} | {off[c]:13.1f} | {s['tokens_s']:12.1f} | {s['tokens_s'] / off[c]:14.2f} | "
              f"{s['router_us_per_token']:19.0f} | {floor[c]:18.0f} | {s['router_us_per_token'] / floor[c]:12.2f}"
              + (f"   ({s['failed']} failed)" if s["failed"] else ""))
    gap = srv[concurrency[0]]["itl_median_s"]
    print(f"one stream: served token gap {gap * 1e3:.1f} ms, engine batch-1 step {off['step_s'] * 1e3:.1f} ms, "
          f"ratio {gap / off['step_s']:.2f}" + ("" if concurrency[0] == 1 else f" (at {concurrency[0]} streams)"))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"offline": {str(k): v for k, v in off.items()}, "served": {str(k): v for k, v in srv.items()},
                       "bare_floor_us_per_token": {str(k): v for k, v in floor.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
