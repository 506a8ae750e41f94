"""Open-loop (Poisson or gamma arrivals at a rate), closed-loop (fixed concurrency) and trace replay."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp

from tokenworks.bench.client import RequestResult, send
from tokenworks.bench.metrics import NOT_SENT
from tokenworks.bench.workloads import BenchRequest


@dataclass(frozen=True)
class Load:
    """rate > 0: open loop; concurrency > 0: closed loop; neither: the workload's own arrival times."""

    rate: float = 0.0
    burstiness: float = 1.0  # gamma shape; 1 = Poisson, < 1 burstier, > 1 smoother
    concurrency: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.concurrency < 0 or self.burstiness <= 0:
            raise ValueError("rate and concurrency must be >= 0 and burstiness > 0")
        if self.rate and self.concurrency:
            raise ValueError("give a rate (open loop) or a concurrency (closed loop), not both")

    def describe(self) -> str:
        if self.rate:
            return f"{self.rate:g} req/s" + (f", burstiness {self.burstiness:g}" if self.burstiness != 1 else " (Poisson)")
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return "trace arrival times"


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gamma inter-arrivals with mean 1/rate (shape = burstiness), seeded."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


async def run_load(base_url: str, requests: list[BenchRequest], load: Load, *, api: str = "completions",
                   model: str | None = None, timeout: float = 300.0, max_duration: float | None = None,
                   progress=None, headers: dict | None = None) -> tuple[list[RequestResult], float]:
    """Send every request; return the results in request order and the run's wall time."""
    results: list[RequestResult | None] = [None] * len(requests)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        t0 = time.perf_counter()
        deadline = None if max_duration is None else t0 + max_duration

        async def one(i: int, when: float) -> None:
            res = await send(client, base_url, api, model, requests[i], i, t0, when, timeout, headers)
            results[i] = res
            if progress is not None:
                progress(res)

        if load.concurrency:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(requests)):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    if deadline is not None and time.perf_counter() > deadline:
                        return
                    i = queue.get_nowait()
                    await one(i, time.perf_counter() - t0)

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            if load.rate:
                times = arrival_times(len(requests), load.rate, load.burstiness, load.seed)
            else:
                times = [r.arrival or 0.0 for r in requests]
            tasks = []
            for i, when in enumerate(times):
                delay = t0 + when - time.perf_counter()
                if deadline is not None and t0 + when > deadline:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, when)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    for i, r in enumerate(results):
        if r is None:  # never sent: the run's time limit came first
            results[i] = RequestResult(index=i, scheduled=0.0, start=0.0, error=f"{NOT_SENT}: time limit reached")
    return results, wall  # type: ignore[return-value]
