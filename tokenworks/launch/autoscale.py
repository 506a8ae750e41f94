"""The planner in the loop: the running fleet sized to the traffic it serves (``serve --autoscale PROFILE``).

Every ``interval`` seconds the autoscaler reads the traffic the router saw over the last ``window`` seconds
(the requests that came, ``Router.arrived``: the rate asked for, which the rate served lags under overload;
and the prompt, cached and generated tokens of those that finished, ``Router.finished``), asks the planner
(planner/planner.py) for the fewest workers of each role the layout runs that meet the SLOs at that traffic,
and moves the fleet one worker per role toward it: it adds at once (the roles' new workers started together,
the look waiting until they are ready) and removes only after the planner asked for fewer ``patience`` times
in a row. A removal is a drain (nothing new is routed to the worker, what it holds finishes, then it stops),
left to run on its own: the looks go on meanwhile, and a draining worker no longer counts. When the plan asks
for more of a role while one of its workers is still draining, that drain is called off (the worker is
routed to again at once) instead of a new worker started. Bounds: one worker of
each role the layout started with, ``max_workers`` in all. A window in which nothing came asks for the least;
one where the SLOs are out of reach of any count (one request at a time on one worker misses them) keeps
the fleet as it is.

The planner simulates prompts as their uncached part (the cache's share the router measured): the prefill
work the fleet does; decode attention is then counted over that part only, a simplification.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import numpy as np

from tokenworks.bench.metrics import SLO
from tokenworks.planner.profile import Profile


@dataclass(frozen=True)
class Observed:
    """The traffic of one window."""

    rate: float  # requests that came per second
    prompt: np.ndarray  # uncached prompt tokens per request
    output: np.ndarray  # generated tokens per request
    cached_share: float  # of all prompt tokens

    def describe(self) -> str:
        return (f"{self.rate:.3g} req/s, prompts {self.prompt.mean():.0f} uncached tokens ({self.cached_share:.0%} "
                f"cached) / outputs {self.output.mean():.0f}")


def observe(arrived, finished, now: float, window: float) -> Observed | None:
    """The traffic of the ``window`` seconds before ``now``: the rate of ``arrived`` (times), the lengths of
    ``finished`` ((when, prompt, cached, generated), oldest first) in the window, or of the last 1,000 finished
    before it when none finished in it yet; None when nothing came, or nothing ever finished."""
    came = sum(1 for t in arrived if t > now - window)
    recent = [f for f in finished if f[0] > now - window] or list(finished)[-1000:]
    if not came or not recent:
        return None
    prompt = np.array([p for _, p, _, _ in recent], dtype=np.int64)
    cached = np.array([c for _, _, c, _ in recent], dtype=np.int64)
    output = np.maximum(1, np.array([g for _, _, _, g in recent], dtype=np.int64))
    return Observed(came / window, np.maximum(1, prompt - cached), output,
                    float(cached.sum() / max(1, prompt.sum())))


def plan_counts(observed: Observed, profile: Profile, roles: tuple[str, ...], slo: SLO, attainment: float,
                max_workers: int, sim_requests: int | None = None) -> dict[str, int] | str:
    """The fewest workers of each of ``roles`` (("both",) or ("prefill", "decode")) meeting the SLOs at the
    observed traffic; else why not: "out of reach" (one request at a time on one worker already misses them,
    so no count helps) or "more" (more than ``max_workers`` would be needed)."""
    from tokenworks.planner.catalog import Catalog, HardwareKind, load_catalog
    from tokenworks.planner.planner import Planner, Traffic

    catalog = load_catalog()
    kind = profile.hardware
    if kind not in catalog:  # a kind the catalog lacks: prices do not matter here
        catalog = Catalog({**catalog.kinds, kind: HardwareKind(kind, profile.device, {}, 0.0, 0.0, 0.0, 0.0)},
                          catalog.path)
    traffic = Traffic(observed.rate, observed.prompt, observed.output)
    sims = sim_requests or min(5000, max(600, len(observed.prompt)))  # the window's requests, at least 600
    planner = Planner({kind: profile}, catalog, traffic, slo, attainment, sims,
                      max_units=max_workers * profile.units)
    if roles == ("both",):
        n = planner.fewest_aggregated(kind)
        counts = None if n is None else {"both": n}
    else:
        p, d = planner.fewest_prefill(kind), planner.fewest_decode(kind)
        sized = None if p is None or d is None else planner.size_pair(kind, p, kind, d)
        counts = None if sized is None else {"prefill": sized[0], "decode": sized[1]}
    if counts is not None:
        return counts
    return "out of reach" if planner.idle(kind)[0] < attainment else "more"


def check(counts: dict[str, int], slo: SLO, max_workers: int) -> tuple[str, ...]:
    """The roles an autoscaled fleet of these starting ``counts`` (role -> workers) grows, or why it cannot be."""
    if slo.ttft is None and slo.tpot is None and slo.e2e is None:
        raise ValueError("--autoscale needs a latency target: --slo-ttft-ms, --slo-tpot-ms or --slo-e2e-ms")
    roles = tuple(sorted(r for r, n in counts.items() if n))
    if roles not in (("both",), ("decode", "prefill")):
        raise ValueError("--autoscale sizes an aggregated fleet or a prefill + decode one, not "
                         + ("a mix of both" if "both" in roles else "prefill or decode workers alone"))
    if sum(counts.values()) > max_workers:
        raise ValueError(f"the layout starts {sum(counts.values())} workers, more than --max-workers {max_workers}")
    return ("both",) if roles == ("both",) else ("prefill", "decode")


class Autoscaler:
    """Moves ``launcher``'s fleet toward the planner's counts (``launcher``: ``counts()``, ``add(role)``,
    ``drain(worker_id)``, ``specs``, ``draining``, ``router.arrived`` and ``router.finished``)."""

    def __init__(self, launcher, profile: Profile, slo: SLO, attainment: float = 0.9, *, interval: float = 30.0,
                 window: float = 60.0, patience: int = 3, max_workers: int = 8, log=None) -> None:
        self.roles = check(launcher.counts(), slo, max_workers)
        self.launcher, self.profile, self.slo, self.attainment = launcher, profile, slo, attainment
        self.interval, self.window, self.patience, self.max_workers = interval, window, patience, max_workers
        self.fewer = {r: 0 for r in self.roles}  # intervals in a row the planner asked for fewer of a role
        self.last: dict[str, int] | None = None  # the planner's last answer
        self.drains: dict[str, asyncio.Task] = {}  # worker id -> its drain, until it ends
        from prometheus_client import Gauge

        registry = launcher.router.metrics.registry
        self.planned = Gauge("tokenworks:autoscale_planned_workers", "Workers of a role the autoscaler's last look "
                             "planned for", ["role"], registry=registry)
        self.observed_rate = Gauge("tokenworks:autoscale_observed_request_rate", "Requests a second that came in "
                                   "the autoscaler's last window", registry=registry)
        self.log = log or (lambda m: print(f"[tokenworks] autoscale: {m}", file=sys.stderr, flush=True))

    def target(self, seen: Observed | None, have: dict[str, int]) -> tuple[dict[str, int], str]:
        """The counts to move toward from the fleet ``have``, and why (the planner's simulations: a thread's work)."""
        least = {r: 1 for r in self.roles}
        if seen is None:
            return least, f"nothing came in {self.window:g} s"
        counts = plan_counts(seen, self.profile, self.roles, self.slo, self.attainment, self.max_workers)
        if counts == "out of reach":  # more workers would not help: keep what there is
            return ({r: have[r] for r in self.roles},
                    f"{seen.describe()}: one worker alone, one request at a time, misses the SLOs: holding")
        if counts == "more":
            most = dict(least)
            for k in range(self.max_workers - len(self.roles)):  # as many as allowed
                most[self.roles[k % len(self.roles)]] += 1
            return most, f"{seen.describe()}: no count within {self.max_workers} workers meets the SLOs"
        return {r: max(1, n) for r, n in counts.items()}, seen.describe()

    async def step(self, now: float | None = None) -> list[str]:
        """One look and at most one change per role; returns what it did ("add decode", "remove decode-2")."""
        router = self.launcher.router  # read here, in the loop that appends to them
        seen = observe(router.arrived, router.finished, time.monotonic() if now is None else now, self.window)
        have = self.launcher.counts()
        want, why = await asyncio.to_thread(self.target, seen, dict(have))
        self.last = want
        self.observed_rate.set(0.0 if seen is None else seen.rate)
        for role, n in want.items():
            self.planned.labels(self._name(role)).set(n)
        done, adds = [], []
        for role in self.roles:
            if want[role] > have[role]:  # the planner's counts keep within max_workers in all
                self.fewer[role] = 0
                kept = self._keep(role)
                if kept is not None:
                    self.log(f"{why}: plan {self._say(want)}, have {self._say(have)}: keeping {kept} (its drain "
                             "called off)")
                    done.append(f"keep {kept}")
                    continue
                if len(self.launcher.specs) + len(adds) >= self.max_workers:  # draining workers still run
                    self.log(f"{why}: plan {self._say(want)}, have {self._say(have)}: one more "
                             f"{self._name(role)} worker once a drain ends (--max-workers {self.max_workers})")
                    continue
                self.log(f"{why}: plan {self._say(want)}, have {self._say(have)}: one more {self._name(role)} worker")
                adds.append(role)
            elif want[role] < have[role]:
                self.fewer[role] += 1
                if self.fewer[role] >= self.patience:
                    self.fewer[role] = 0
                    wid = max((w for w, s in self.launcher.specs.items()
                               if s.role == role and w not in self.launcher.draining and w not in self.drains),
                              key=_order)
                    self.log(f"{why}: plan {self._say(want)}, have {self._say(have)} for {self.patience} looks: "
                             f"draining {wid}")
                    self.drains[wid] = asyncio.create_task(self._drain(wid))
                    await asyncio.sleep(0)  # the drain begins: the worker counts as draining from now
                    done.append(f"remove {wid}")
            else:
                self.fewer[role] = 0
        if adds:
            t0 = time.monotonic()
            started = await asyncio.gather(*(self.launcher.add(r) for r in adds), return_exceptions=True)
            for role, wid in zip(adds, started):
                if isinstance(wid, BaseException):
                    self.log(f"one more {self._name(role)} worker did not start: {type(wid).__name__}: {wid}")
                else:
                    self.log(f"{wid} ready in {time.monotonic() - t0:.1f} s")
                    done.append(f"add {role}")
        return done

    def _keep(self, role: str) -> str | None:
        """Call off the drain of the newest worker of ``role`` still draining; its id, or None."""
        draining = [w for w, task in self.drains.items()
                    if not task.done() and self.launcher.specs.get(w) is not None and self.launcher.specs[w].role == role]
        if not draining:
            return None
        wid = max(draining, key=_order)
        self.drains.pop(wid).cancel()  # it waits on the worker's requests: nothing is removed
        self.launcher.undrain(wid)
        return wid

    async def _drain(self, worker_id: str) -> None:
        t0 = time.monotonic()
        try:
            await self.launcher.drain(worker_id)
            self.log(f"{worker_id} drained and stopped in {time.monotonic() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001 - a drain that fails leaves the worker serving
            self.log(f"draining {worker_id} failed: {type(e).__name__}: {e}")
        finally:
            if self.drains.get(worker_id) is asyncio.current_task():
                del self.drains[worker_id]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.step()
            except Exception as e:  # noqa: BLE001 - a failed look or start must not end serving
                self.log(f"skipped a look: {type(e).__name__}: {e}")

    def _say(self, counts: dict[str, int]) -> str:
        return " + ".join(f"{counts.get(r, 0)} {self._name(r)}" for r in self.roles)

    @staticmethod
    def _name(role: str) -> str:
        return "aggregated" if role == "both" else role


def _order(worker_id: str) -> tuple[int, str]:
    """The newest worker of a role last: "decode-10" after "decode-9"."""
    head, _, tail = worker_id.rpartition("-")
    return (int(tail), head) if tail.isdigit() else (-1, worker_id)
