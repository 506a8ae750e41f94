"""Disaggregated vs aggregated serving on the same device, same run: greedy equality, then throughput and latency.

1. Equality: an aggregated server and a disaggregated one (1 prefill + 1 decode worker, every prompt
   prefilled remotely) on ``--check-dtype`` (float32: token-identical expected) answer the same prompts
   one at a time, greedily; their texts must be equal and no KV pull may fail.
2. Load: both layouts on ``--dtype`` under a closed loop at each ``--concurrency`` with fixed prompt and
   output lengths; prints output tokens/s, TTFT and ITL side by side with the ratios disaggregated /
   aggregated, and from the disaggregated server's /metrics: remote prefills, KV pulls failed (by cause)
   and recomputed, the KV transfer time.

    python benchmarks/disagg_serving.py --model DIR --serve-flags "--gpus 0 --kv-transport tcp"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import httpx  # noqa: E402

from tests.serving import Server  # noqa: E402

LAYOUTS = {
    "aggregated": ["--aggregated-workers", "1"],
    "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-threshold", "0"],
}


def start(layout: str, model: str, dtype: str, serve_flags: list[str]) -> Server:
    return Server("--model", model, "--dtype", dtype, *serve_flags, *LAYOUTS[layout], startup_timeout=300)


def stop(server: Server, layout: str) -> None:
    """Stop the server, first printing the lines of its log that say something went wrong."""
    bad = [line for line in server.output().splitlines()
           if any(k in line for k in ("failed", "unhealthy", "Traceback", "Error", "restarting"))]
    for line in bad[-10:]:
        print(f"  [{layout} log] {line}", flush=True)
    server.stop()


def step_figures(before: dict, after: dict, wall: float) -> dict:
    """Per worker over a run: engine steps, their mean wall time and the fraction of the run spent in them."""
    out = {}
    for wid, a in after.items():
        b = before.get(wid, {})
        steps = a.get("steps", 0) - b.get("steps", 0)
        busy = a.get("busy_seconds", 0.0) - b.get("busy_seconds", 0.0)
        out[wid] = {"steps": steps, "step_ms": busy / steps * 1e3 if steps else 0.0, "busy": busy / wall if wall else 0}
    return out


def kv_metrics(server: Server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {"remote_prefills": server.metric("tokenworks:prefills_total", 'where="remote"'),
           "kv_fallbacks": server.metric("tokenworks:kv_transfer_fallbacks_total"),
           "kv_bytes": server.metric("tokenworks:kv_transfer_bytes_total"),
           "kv_seconds_sum": server.metric("tokenworks:kv_transfer_seconds_sum"),
           "kv_pulls": server.metric("tokenworks:kv_transfer_seconds_count"), "kv_failures": {}}
    for line in text.splitlines():
        if line.startswith("tokenworks:kv_transfer_failures_total{"):
            cause = line.split('cause="', 1)[1].split('"', 1)[0]
            out["kv_failures"][cause] = float(line.rsplit(" ", 1)[1])
    return out


def check_equality(model: str, dtype: str, serve_flags: list[str], n: int) -> dict:
    from tokenworks.bench.workloads import synthetic

    prompts = [r.prompt for r in synthetic(n, "uniform:40:600", "fixed:1", seed=7)]
    texts = {}
    metrics = {}
    for layout in LAYOUTS:
        server = start(layout, model, dtype, serve_flags)
        try:
            texts[layout] = [httpx.post(server.url + "/v1/completions", timeout=120, json={
                "prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
                for p in prompts]
            metrics[layout] = kv_metrics(server)
        finally:
            stop(server, layout)
    same = sum(a == b for a, b in zip(texts["aggregated"], texts["disaggregated"]))
    d = metrics["disaggregated"]
    ok = same == n and d["remote_prefills"] == n and d["kv_fallbacks"] == 0
    print(f"greedy equality ({dtype}): {same}/{n} identical; disaggregated: {d['remote_prefills']:.0f} remote "
          f"prefills, {d['kv_fallbacks']:.0f} KV recomputes -> {'OK' if ok else 'FAILED'}", flush=True)
    return {"dtype": dtype, "prompts": n, "identical": same, "disaggregated_metrics": d, "ok": ok}


def run_load(model: str, dtype: str, serve_flags: list[str], concurrency: list[int], input_len: int,
             output_len: int, requests_per_level: int) -> dict:
    from tokenworks.bench.loadgen import Load, run_load as drive
    from tokenworks.bench.metrics import SLO, summarize
    from tokenworks.bench.workloads import synthetic

    out: dict = {}
    for layout in LAYOUTS:
        server = start(layout, model, dtype, serve_flags)
        try:
            rows = {}
            for c in concurrency:
                n = max(2 * c, requests_per_level)
                reqs = synthetic(n, f"fixed:{input_len}", f"fixed:{output_len}", seed=c)
                before = server.workers()
                results, wall = asyncio.run(drive(server.url, reqs, Load(concurrency=c), timeout=300))
                time.sleep(0.6)  # one more heartbeat: the workers' step counters cover the whole run
                s = summarize(results, wall, SLO())
                s["workers"] = step_figures(before, server.workers(), wall)
                rows[c] = s
                print(f"{layout:>13} c={c:<3} {s['completed']}/{s['requests']} ok  "
                      f"{s['output_token_throughput']:8.0f} out tok/s  TTFT p50 {s['ttft_s']['median'] * 1e3:7.1f} ms "
                      f"p99 {s['ttft_s']['p99'] * 1e3:7.1f} ms  ITL p50 {s['itl_s']['median'] * 1e3:6.1f} ms "
                      f"p99 {s['itl_s']['p99'] * 1e3:6.1f} ms", flush=True)
                for wid, w in s["workers"].items():
                    print(f"{'':>19}{wid}: {w['steps']} steps, mean {w['step_ms']:.1f} ms, busy {w['busy']:.0%}",
                          flush=True)
            out[layout] = {"runs": rows, "metrics": kv_metrics(server)}
        finally:
            stop(server, layout)
    print("\nconcurrency | out tok/s agg | disagg | disagg/agg | TTFT p50 agg ms | disagg | disagg/agg | "
          "ITL p99 agg ms | disagg")
    for c in concurrency:
        a, d = out["aggregated"]["runs"][c], out["disaggregated"]["runs"][c]
        ta, td = a["ttft_s"]["median"], d["ttft_s"]["median"]
        print(f"{c:>11} | {a['output_token_throughput']:13.0f} | {d['output_token_throughput']:6.0f} | "
              f"{d['output_token_throughput'] / a['output_token_throughput']:10.2f} | {ta * 1e3:15.1f} | "
              f"{td * 1e3:6.1f} | {td / ta:10.2f} | {a['itl_s']['p99'] * 1e3:14.1f} | {d['itl_s']['p99'] * 1e3:6.1f}")
    m = out["disaggregated"]["metrics"]
    pulls = m["kv_pulls"] or 1
    print(f"disaggregated: {m['remote_prefills']:.0f} remote prefills, {m['kv_pulls']:.0f} KV pulls, "
          f"{m['kv_fallbacks']:.0f} recomputed, failures by cause {m['kv_failures'] or '{}'}, "
          f"mean KV time {m['kv_seconds_sum'] / pulls * 1e3:.1f} ms, {m['kv_bytes'] / 2**20:.0f} MiB moved", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a servable model folder (benchmarks/random_chat_model.py)")
    ap.add_argument("--serve-flags", default="", help="flags for both servers, e.g. '--gpus 0 --kv-transport tcp'")
    ap.add_argument("--check-dtype", default="float32", help="dtype of the equality check (default: float32)")
    ap.add_argument("--num-check", type=int, default=8, help="prompts in the equality check (default: 8)")
    ap.add_argument("--dtype", default="auto", help="dtype of the load runs (default: the device's)")
    ap.add_argument("--concurrency", default="1,16,64", help="closed-loop concurrencies (default: 1,16,64)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=16, help="requests per level, at least 2x its concurrency")
    ap.add_argument("--skip-check", action="store_true", help="only the load runs")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ns = ap.parse_args()
    flags = shlex.split(ns.serve_flags)
    result = {}
    if not ns.skip_check:
        result["equality"] = check_equality(ns.model, ns.check_dtype, flags, ns.num_check)
    result["load"] = run_load(ns.model, ns.dtype, flags, [int(c) for c in ns.concurrency.split(",")],
                              ns.input_len, ns.output_len, ns.num_requests)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result.get("equality", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
