"""The autoscaler (launch/autoscale.py): what it reads of the traffic, what the planner asks of it, and how it
moves a fleet toward that, on a stand-in launcher (the launcher's add and drain are tested with real
workers in tests/test_launch.py and tests/test_ray.py)."""

import asyncio
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.test_planner import make_profile
from tokenworks.bench.metrics import SLO
from tokenworks.launch.autoscale import Autoscaler, Observed, _order, observe, plan_counts

SLOS = SLO(ttft=0.2, tpot=0.03)


class Fleet:
    """A launcher's face as the autoscaler sees it: counts, add, drain, specs, the router's finished requests."""

    def __init__(self, **counts: int) -> None:
        self.specs = {}
        self.draining: set[str] = set()
        self.router = SimpleNamespace(arrived=deque(), finished=deque(),
                                      metrics=SimpleNamespace(registry=CollectorRegistry()))
        self.added, self.drained = [], []
        self.gate = asyncio.Event()  # drains end when it is set
        self.gate.set()
        for role, n in counts.items():
            for _ in range(n):
                self._new(role)

    def _new(self, role: str) -> str:
        k = sum(1 for s in self.specs.values() if s.role == role)
        while f"{role}-{k}" in self.specs:
            k += 1
        self.specs[f"{role}-{k}"] = SimpleNamespace(role=role)
        return f"{role}-{k}"

    def counts(self) -> dict[str, int]:
        out = {"prefill": 0, "decode": 0, "both": 0}
        for wid, s in self.specs.items():
            out[s.role] += wid not in self.draining
        return out

    async def add(self, role: str) -> str:
        wid = self._new(role)
        self.added.append(wid)
        return wid

    async def drain(self, worker_id: str) -> None:
        self.draining.add(worker_id)
        await self.gate.wait()  # what the worker holds finishing
        del self.specs[worker_id]
        self.draining.discard(worker_id)
        self.drained.append(worker_id)

    def undrain(self, worker_id: str) -> None:
        self.draining.discard(worker_id)

    def traffic(self, now: float, rate: float, seconds: float, prompt: int = 500, cached: int = 0, out: int = 100):
        """``rate`` requests a second came and finished over the ``seconds`` before ``now``."""
        n = int(rate * seconds)
        times = [now - seconds + seconds * (i + 1) / n for i in range(n)]
        self.router.arrived.extend(times)
        self.router.finished.extend((t, prompt, cached, out) for t in times)


def test_a_window_is_read_as_the_rate_that_came_and_the_lengths_and_cache_share_of_what_finished():
    arrived = [0.5, 50.0, 52.0, 53.0, 57.0, 59.0]
    finished = [(1.0, 900, 0, 10), (55.0, 400, 300, 20), (58.0, 600, 100, 0), (60.0, 200, 0, 30)]
    seen = observe(arrived, finished, now=60.0, window=10.0)
    assert seen.rate == pytest.approx(0.4)  # 4 came in the last 10 s (3 finished: overload shows in the gap)
    assert seen.prompt.tolist() == [100, 500, 200] and seen.output.tolist() == [20, 1, 30]
    assert seen.cached_share == pytest.approx(400 / 1200)
    later = observe(arrived + [75.0], finished, now=80.0, window=10.0)  # none finished in the window yet
    assert later.rate == pytest.approx(0.1) and later.prompt.tolist() == [900, 100, 500, 200]
    assert observe(arrived, finished, now=200.0, window=10.0) is None  # nothing came
    assert observe([199.0], [], now=200.0, window=10.0) is None  # nothing finished ever: no lengths yet


def test_more_traffic_asks_the_planner_for_more_workers_and_a_cached_prefix_for_fewer_prefill_workers():
    prof = make_profile()
    counts = [plan_counts(Observed(rate, np.full(300, 500), np.full(300, 100), 0.0), prof, ("prefill", "decode"),
                          SLOS, 0.9, 16) for rate in (20, 200, 1000)]
    assert [c["prefill"] for c in counts] == sorted(c["prefill"] for c in counts)
    assert [c["decode"] for c in counts] == sorted(c["decode"] for c in counts)
    assert counts[0] == {"prefill": 1, "decode": 1} and sum(counts[-1].values()) > 6
    both = [plan_counts(Observed(rate, np.full(300, 500), np.full(300, 100), 0.0), prof, ("both",), SLOS, 0.9, 16)
            for rate in (20, 1000)]
    assert both[0] == {"both": 1} and both[1]["both"] > 3
    cached = plan_counts(Observed(1000, np.full(300, 50), np.full(300, 100), 0.9), prof, ("prefill", "decode"),
                         SLOS, 0.9, 16)  # 90 % of each 500-token prompt cached: 50 tokens left to prefill
    assert cached["prefill"] < counts[-1]["prefill"]
    assert plan_counts(Observed(1000, np.full(300, 500), np.full(300, 100), 0.0), prof, ("both",), SLOS, 0.9,
                       2) == "more"  # 2 workers cannot
    assert plan_counts(Observed(1, np.full(300, 500), np.full(300, 100), 0.0), prof, ("both",), SLO(ttft=1e-4),
                       0.9, 8) == "out of reach"  # no worker prefills 500 tokens in 0.1 ms


def test_the_fleet_grows_one_worker_a_role_a_look_and_shrinks_only_after_patience():
    async def main():
        fleet = Fleet(prefill=1, decode=1)
        scaler = Autoscaler(fleet, make_profile(), SLOS, interval=1, window=10, patience=3, max_workers=12,
                            log=lambda m: None)
        now = 100.0
        fleet.traffic(now, rate=1000, seconds=10)
        steps = []
        for _ in range(12):  # heavy traffic: one more of each role that is short, each look, up to the plan
            steps.append(await scaler.step(now))
        want = scaler.last
        assert fleet.counts()["prefill"] == want["prefill"] > 1 and fleet.counts()["decode"] == want["decode"] > 1
        registry = fleet.router.metrics.registry  # what the last look saw and planned, on /metrics
        assert registry.get_sample_value("tokenworks:autoscale_observed_request_rate") == pytest.approx(1000)
        assert registry.get_sample_value("tokenworks:autoscale_planned_workers", {"role": "decode"}) == want["decode"]
        assert steps[0] == ["add prefill", "add decode"] and steps[-1] == []
        assert sum(fleet.counts().values()) <= 12
        fleet.router.arrived.clear()  # traffic stops: the plan is one of each, but only after 3 looks in a row
        assert await scaler.step(now + 100) == [] and await scaler.step(now + 101) == []
        assert await scaler.step(now + 102) == [f"remove prefill-{want['prefill'] - 1}",
                                                f"remove decode-{want['decode'] - 1}"]  # the newest go first
        for k in range(40):
            await scaler.step(now + 103 + k)
        assert fleet.counts() == {"prefill": 1, "decode": 1, "both": 0}  # never below one of each
        assert sorted(["decode-9", "decode-10", "decode-2"], key=_order) == ["decode-2", "decode-9", "decode-10"]

    asyncio.run(main())


def test_a_slow_drain_runs_on_its_own_and_is_called_off_when_load_comes_back():
    async def main():
        fleet, said = Fleet(both=3), []
        scaler = Autoscaler(fleet, make_profile(), SLOS, interval=1, window=10, patience=1, max_workers=3,
                            log=said.append)
        fleet.gate.clear()  # the drained workers' requests take long to finish
        looks = [await asyncio.wait_for(scaler.step(100.0 + k), 5) for k in range(3)]  # no traffic: fewer
        assert looks == [["remove both-2"], ["remove both-1"], []]  # a look each, not waiting on the drains
        assert fleet.draining == {"both-1", "both-2"} and fleet.counts()["both"] == 1 and fleet.drained == []
        fleet.traffic(200.0, rate=5000, seconds=10)  # load is back while both still drain: kept, newest first
        assert await scaler.step(200.0) == ["keep both-2"] and fleet.draining == {"both-1"}
        assert "keeping both-2 (its drain called off)" in said[-1]
        assert await scaler.step(200.0) == ["keep both-1"] and fleet.counts()["both"] == 3 and fleet.added == []
        fleet.gate.set()  # the called-off drains remove nothing
        await asyncio.sleep(0.01)
        assert fleet.drained == [] and not scaler.drains and fleet.counts()["both"] == 3
        scaler.target = lambda seen, have: ({"both": 2}, "asked for two")  # a drain that ends is said
        assert await scaler.step(300.0) == ["remove both-2"]
        await asyncio.sleep(0.01)
        assert fleet.drained == ["both-2"] and any("both-2 drained and stopped in" in m for m in said)

        async def fails(role):
            raise RuntimeError("no device left")

        fleet.add = fails  # a worker that does not start is said, and not counted
        scaler.target = lambda seen, have: ({"both": 3}, "asked for three")
        assert await scaler.step(400.0) == [] and "one more aggregated worker did not start: RuntimeError" in said[-1]
        assert fleet.counts()["both"] == 2

    asyncio.run(main())


def test_a_draining_worker_holds_its_place_under_max_workers_until_it_stops():
    async def main():
        fleet, said = Fleet(prefill=2, decode=2), []
        scaler = Autoscaler(fleet, make_profile(), SLOS, interval=1, window=10, patience=1, max_workers=4,
                            log=said.append)
        fleet.gate.clear()
        scaler.target = lambda seen, have: ({"prefill": 2, "decode": 1}, "fewer decode")
        assert await scaler.step(100.0) == ["remove decode-1"]  # begun: no longer counted at the next look
        assert await scaler.step(101.0) == [] and fleet.counts()["decode"] == 1 and fleet.draining == {"decode-1"}
        scaler.target = lambda seen, have: ({"prefill": 3, "decode": 1}, "more prefill")
        assert await scaler.step(102.0) == [] and fleet.added == []  # 4 processes run: no room for a 5th
        assert "one more prefill worker once a drain ends (--max-workers 4)" in said[-1]
        fleet.gate.set()
        await asyncio.sleep(0.01)
        assert await scaler.step(103.0) == ["add prefill"] and fleet.counts() == {"prefill": 3, "decode": 1, "both": 0}

    asyncio.run(main())


def test_an_aggregated_fleet_is_bounded_by_max_workers_and_a_mixed_one_is_refused():
    async def main():
        fleet = Fleet(both=1)
        scaler = Autoscaler(fleet, make_profile(), SLOS, interval=1, window=10, patience=2, max_workers=3,
                            log=lambda m: None)
        fleet.traffic(100.0, rate=5000, seconds=10)  # more than 3 workers can serve
        for _ in range(6):
            await scaler.step(100.0)
        assert fleet.counts()["both"] == 3 and fleet.added == ["both-1", "both-2"]
        held = Autoscaler(Fleet(both=2), make_profile(), SLO(ttft=1e-4), interval=1, window=10, max_workers=4,
                          log=lambda m: None)  # an SLO no count meets: the fleet stays as it is
        held.launcher.traffic(100.0, rate=50, seconds=10)
        assert [await held.step(100.0) for _ in range(4)] == [[]] * 4 and held.launcher.counts()["both"] == 2
        with pytest.raises(ValueError, match="not a mix"):
            Autoscaler(Fleet(prefill=1, both=1), make_profile(), SLOS)
        with pytest.raises(ValueError, match="latency target"):
            Autoscaler(Fleet(both=1), make_profile(), SLO())

    asyncio.run(main())


def test_a_served_fleet_grows_under_load_and_shrinks_when_it_stops(tmp_path):
    """The real server with --autoscale and a profile whose worker prefills slowly (50 ms a prompt token: the
    test's prompts of about 6 tokens, 3 a second, take two workers for a 1 s TTFT): requests from the openai
    client at that rate bring a second worker; when they stop, it is drained after the looks' patience."""
    import concurrent.futures
    import time
    from dataclasses import replace

    from openai import OpenAI

    from tests.serving import Server

    profile = tmp_path / "slow.json"
    replace(make_profile(pa=0.001, pb=0.05, hardware="CPU-EPYC-1core"), device="cpu").save(str(profile))
    server = Server("--aggregated-workers", "1", "--autoscale", str(profile), "--slo-ttft-ms", "1000",
                    "--autoscale-interval", "1", "--autoscale-window", "4", "--max-workers", "2")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

        def ask(i: int) -> str:
            return client.completions.create(model="default", prompt=f"Count to {i}:", max_tokens=4,
                                             temperature=0).choices[0].text

        grew_at = None
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            t0, sent = time.monotonic(), []
            while time.monotonic() - t0 < 20 and grew_at is None:
                sent.append(pool.submit(ask, len(sent)))
                time.sleep(1 / 3)
                if len(server.workers()) == 2:
                    grew_at = time.monotonic() - t0
            assert all(isinstance(f.result(timeout=120), str) for f in sent)  # every request answered
        assert grew_at is not None, server.output()[-3000:]
        t1 = time.monotonic()
        while len(server.workers()) > 1 and time.monotonic() - t1 < 30:
            time.sleep(0.25)
        assert len(server.workers()) == 1, server.output()[-3000:]
        log = server.output()
        assert "one more aggregated worker" in log and "nothing came in 4 s" in log and "draining agg-1" in log
    finally:
        server.stop()


def test_serve_refuses_an_autoscaled_layout_it_cannot_grow_before_starting_a_worker(tmp_path):
    import subprocess
    import sys
    from dataclasses import replace

    profile = tmp_path / "p.json"
    replace(make_profile(hardware="CPU-EPYC-1core"), device="cpu").save(str(profile))
    for flags, why in ((["--aggregated-workers", "1"], "needs a latency target"),
                       (["--slo-ttft-ms", "100", "--prefill-workers", "1", "--aggregated-workers", "1"], "a mix of both"),
                       (["--slo-ttft-ms", "100", "--decode-workers", "1"], "prefill or decode workers alone"),
                       (["--slo-ttft-ms", "100", "--aggregated-workers", "3", "--max-workers", "2"],
                        "more than --max-workers 2")):
        r = subprocess.run([sys.executable, "-m", "tokenworks.cli", "serve", "--port", "0", "--autoscale", str(profile),
                            *flags], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and why in r.stderr and "workers ready" not in r.stderr, r.stderr[-2000:]


def test_a_launchers_drain_called_off_leaves_its_worker_routed_to_and_running():
    """Launcher.drain cancelled while the worker still holds requests, then undrain: the router routes to it again,
    its process is not stopped, and a later drain that ends stops it."""
    from tokenworks.config import EngineArgs
    from tokenworks.launch.launcher import Launcher, WorkerSpec

    class Router:  # the router's face a drain uses
        def __init__(self):
            self.views = {w: SimpleNamespace(draining=False, busy=True) for w in ("agg-0", "agg-1")}

        def drain(self, w):
            self.views[w].draining = True

        def undrain(self, w):
            self.views[w].draining = False

        def drained(self, w):
            return not self.views[w].busy

        def remove(self, w):
            self.views.pop(w)

    class Stand(Launcher):
        def _terminate(self, worker_ids, grace):
            self.stopped.extend(worker_ids)

    async def main():
        router = Router()
        launcher = Stand(router, EngineArgs(), "tcp")
        launcher.stopped = []
        launcher.specs = {w: WorkerSpec(w, "both", None) for w in ("agg-0", "agg-1")}
        task = asyncio.create_task(launcher.drain("agg-1"))
        await asyncio.sleep(0.25)
        assert router.views["agg-1"].draining and launcher.counts()["both"] == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        launcher.undrain("agg-1")
        assert not router.views["agg-1"].draining and launcher.counts()["both"] == 2 and launcher.stopped == []
        router.views["agg-1"].busy = False
        await asyncio.wait_for(launcher.drain("agg-1"), 5)
        assert launcher.stopped == ["agg-1"] and "agg-1" not in launcher.specs and "agg-1" not in router.views

    asyncio.run(main())
