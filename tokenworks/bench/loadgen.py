"""Open-loop (Poisson or gamma arrivals at a rate), closed-loop (fixed concurrency) and trace replay.

In a closed loop each of the ``concurrency`` users sends its next request when its last one ends; one that was
refused with a Retry-After (a server at capacity: 429) waits that long first, as a client would, instead of
running through the rest of the requests in the time the refusals take.

``drive`` runs a load to its end from ordinary code, on uvloop where it is installed, and can spread it over
several client processes: one client core parses about 20,000 streamed events a second on the 2-core VM this
was written on, less than one GPU worker serving a small model produces, and a benchmark must measure the
server, not its client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import queue as queue_mod
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


MAX_RETRY_WAIT = 60.0  # seconds a closed-loop user waits on a refusal's Retry-After, at most


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

            async def worker() -> None:  # one user: the next request when the last one ends
                while not queue.empty():
                    if deadline is not None and time.perf_counter() > deadline:
                        return
                    i = queue.get_nowait()
                    await one(i, time.perf_counter() - t0)
                    wait = results[i].retry_after
                    if wait:  # refused: back when told, as a client would, not at once with the next request
                        if deadline is not None:
                            wait = min(wait, deadline - time.perf_counter())
                        await asyncio.sleep(max(0.0, min(wait, MAX_RETRY_WAIT)))

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


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def default_client_processes() -> int:
    """Client processes for a benchmark on this machine: one where cores are few (more would take them from
    the server under test), else up to 4."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(4, cores // 4)


def drive(base_url: str, requests: list[BenchRequest], load: Load, *, processes: int = 1, progress=None,
          **kw) -> tuple[list[RequestResult], float]:
    """``run_load`` to its end, called from ordinary code. With ``processes`` > 1 the requests are dealt round
    robin to that many client processes, which start together: a closed loop's concurrency is split between
    them, an open loop's arrival times are drawn here (so the run is the one a single process would send).
    The results come back in request order, the wall time is the longest process's; ``progress`` is called
    here, as each request ends."""
    n = max(1, min(processes, load.concurrency or len(requests), len(requests)))
    if n == 1:
        with _runner() as runner:
            return runner.run(run_load(base_url, requests, load, progress=progress, **kw))
    if load.rate:
        times = arrival_times(len(requests), load.rate, load.burstiness, load.seed)
        requests = [dataclasses.replace(r, arrival=t) for r, t in zip(requests, times)]
    parts = []
    for k in range(n):
        part_load = Load(concurrency=load.concurrency // n + (k < load.concurrency % n)) if load.concurrency \
            else Load()  # open loop and traces: each request at its own arrival time
        parts.append((list(range(k, len(requests), n)), part_load))
    ctx = multiprocessing.get_context("spawn")  # not fork: the caller may hold threads and sockets
    events, start = ctx.Queue(), ctx.Barrier(n + 1)
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(base_url, [requests[i] for i in idx], idx, part_load, kw, start, events))
             for idx, part_load in parts]
    for p in procs:
        p.start()
    results: list[RequestResult | None] = [None] * len(requests)
    wall, done = 0.0, 0
    try:
        start.wait(timeout=120)  # every client has imported its modules and is ready: go
        while done < n:
            try:
                kind, payload = events.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a load generator process ended with exit code {dead[0].exitcode}")
                continue
            if kind == "result":
                results[payload.index] = payload
                if progress is not None:
                    progress(payload)
            elif kind == "error":
                raise RuntimeError(f"a load generator process failed: {payload}")
            else:
                part_wall, unreported = payload
                wall = max(wall, part_wall)
                for r in unreported:
                    results[r.index] = r
                done += 1
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return results, wall  # type: ignore[return-value]


def _client_process(base_url: str, requests: list[BenchRequest], indices: list[int], load: Load, kw: dict,
                    start, events) -> None:
    """One of ``drive``'s client processes: its share of the requests, each result sent once, as it ends, under its
    index in the run; at the end its wall time and the results no request ending reported (those never sent)."""
    try:
        reported: set[int] = set()

        def progress(res: RequestResult) -> None:
            reported.add(res.index)
            events.put(("result", dataclasses.replace(res, index=indices[res.index])))

        start.wait(timeout=120)
        with _runner() as runner:
            results, wall = runner.run(run_load(base_url, requests, load, progress=progress, **kw))
        events.put(("done", (wall, [dataclasses.replace(r, index=indices[r.index]) for r in results
                                     if r.index not in reported])))
    except BaseException as e:  # noqa: BLE001 - told to the parent, which raises it
        events.put(("error", f"{type(e).__name__}: {e}"))
