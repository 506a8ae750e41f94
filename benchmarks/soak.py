"""Soak: minutes of mixed load on the real server while a worker is SIGKILLed every M seconds.

Prints requests sent, completed and failed (with why), tokens lost (a
completed request must carry exactly its max_tokens, since every request
sets ignore_eos), how fast the router noticed each death, and the router's
and workers' resident memory at the start and the end.

    python benchmarks/soak.py [--minutes 3] [--kill-every 20] [--rate 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.serving import Server  # noqa: E402
from tokenworks.bench import workloads as W  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(server: Server) -> dict[str, float | None]:
    out = {"router": rss_mib(server.proc.pid)}
    for wid, w in server.workers().items():
        out[wid] = rss_mib(w["pid"])
    return out


async def main_async(ns) -> int:
    server = Server("--prefill-workers", "1", "--decode-workers", "2", "--kv-transport", ns.kv_transport)
    try:
        mem_start = memory(server)
        rng = random.Random(ns.seed)
        stats = {"sent": 0, "completed": 0, "failed": 0, "tokens_lost": 0, "rejected_429": 0}
        reasons: dict[str, int] = {}
        detect: list[float] = []
        deadline = time.monotonic() + ns.minutes * 60
        tasks: list[asyncio.Task] = []

        async def one(client: httpx.AsyncClient, req: W.BenchRequest) -> None:
            body = {"prompt": req.prompt, "max_tokens": req.max_tokens, "ignore_eos": True, "temperature": 0.7}
            stats["sent"] += 1
            try:
                r = await client.post(server.url + "/v1/completions", json=body)
            except httpx.HTTPError as e:
                stats["failed"] += 1
                reasons[type(e).__name__] = reasons.get(type(e).__name__, 0) + 1
                return
            if r.status_code == 429:
                stats["rejected_429"] += 1
                return
            if r.status_code != 200:
                stats["failed"] += 1
                key = f"HTTP {r.status_code}: {r.text[:80]}"
                reasons[key] = reasons.get(key, 0) + 1
                return
            got = r.json()["usage"]["completion_tokens"]
            stats["completed"] += 1
            stats["tokens_lost"] += max(0, req.max_tokens - got)

        async def killer() -> None:
            while time.monotonic() < deadline - ns.kill_every / 2:
                await asyncio.sleep(ns.kill_every)
                workers = server.workers()
                victims = [(wid, w) for wid, w in workers.items() if w["alive"]]
                if not victims:
                    continue
                wid, w = rng.choice(victims)
                os.kill(w["pid"], signal.SIGKILL)
                t = time.monotonic()
                while server.workers()[wid]["alive"] and time.monotonic() - t < 30:
                    await asyncio.sleep(0.01)
                detect.append(time.monotonic() - t)
                print(f"[soak] killed {wid} (pid {w['pid']}); router noticed in {detect[-1] * 1000:.0f} ms",
                      file=sys.stderr, flush=True)

        reqs = W.mixed(100000, ns.seed, long_fraction=0.1, long_input="uniform:300:600", output_len="uniform:8:48")
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=500)) as client:
            kill_task = asyncio.create_task(killer())
            i = 0
            while time.monotonic() < deadline:
                tasks.append(asyncio.create_task(one(client, reqs[i])))
                i += 1
                await asyncio.sleep(rng.expovariate(ns.rate))
            await kill_task
            await asyncio.gather(*tasks)
        workers = server.wait_idle(60)
        mem_end = memory(server)
        print(f"\nsoak: {ns.minutes:g} min, {ns.rate:g} req/s offered, a worker SIGKILLed every {ns.kill_every:g} s")
        print(f"faults injected: {len(detect)}; time to notice a dead worker: "
              f"{'-' if not detect else f'median {sorted(detect)[len(detect) // 2] * 1000:.0f} ms, max {max(detect) * 1000:.0f} ms'}")
        print(f"requests sent {stats['sent']}, completed {stats['completed']}, failed {stats['failed']}, "
              f"rejected 429 {stats['rejected_429']}; tokens lost {stats['tokens_lost']}")
        for k, v in reasons.items():
            print(f"  failed: {v} x {k}")
        print(f"leaked KV blocks at the end: {sum(w['blocks_used'] for w in workers.values())}")
        print("resident memory (MiB), start -> end:")
        for k in mem_end:
            a, b = mem_start.get(k), mem_end.get(k)
            print(f"  {k:<10} {'-' if a is None else f'{a:.0f}'} -> {'-' if b is None else f'{b:.0f}'}"
                  + ("   (restarted)" if k != "router" and a is not None and b is not None and b < a * 0.8 else ""))
        print(f"router: {server.metric('tokenworks:worker_deaths_total'):.0f} deaths seen, "
              f"{server.metric('tokenworks:request_failovers_total'):.0f} requests continued elsewhere, "
              f"{server.metric('tokenworks:kv_transfer_fallbacks_total'):.0f} KV pulls recomputed")
        return 0
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--kill-every", type=float, default=20.0, metavar="SECONDS")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second offered (Poisson)")
    ap.add_argument("--kv-transport", choices=["nixl", "tcp"], default="nixl")
    ap.add_argument("--seed", type=int, default=0)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
