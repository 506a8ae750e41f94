"""``tokenworks plan``: the cheapest layouts that meet latency targets, found by simulation.

For each hardware kind the profile is measured there or projected by
roofline (``catalog.project``). Then, following DistServe's placement
search, each phase is sized alone and the pair checked together:

1. prefill workers: the fewest of a kind whose TTFT meets the target
   attainment with decode capacity to spare;
2. decode workers: the fewest of a kind whose TPOT meets it with prefill to
   spare;
3. every (prefill kind, decode kind) pair starts from those counts and is
   simulated whole, adding a worker to the phase that misses until the
   layout meets every SLO; aggregated layouts of each kind are sized the
   same way.

Candidates within the budget and accelerator limit are ranked by cost per
hour at the target rate; the best few are simulated again at rising rates
for their goodput. The first fifth of each simulated run is warm-up and
not counted.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from tokenworks.bench.metrics import SLO
from tokenworks.planner.catalog import Catalog, project
from tokenworks.planner.profile import Profile
from tokenworks.planner.simulator import Deployment, Pool, SimResult, SimWorkload, host_tier_tokens, met_slo, simulate

WARMUP = 0.2


@dataclass(frozen=True)
class Traffic:
    """What the fleet must serve: Poisson (or gamma) arrivals at ``rate`` with these lengths."""

    rate: float
    prompt_len: np.ndarray  # a sample of prompt lengths, drawn from in order (cycled)
    output_len: np.ndarray
    burstiness: float = 1.0
    seed: int = 0
    prefix_blocks: list | None = None  # per sample, its prompt's shared blocks (SimWorkload.prefix_blocks), or None
    block_tokens: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("the request rate must be positive")
        if len(self.prompt_len) == 0 or len(self.prompt_len) != len(self.output_len):
            raise ValueError("traffic needs matching prompt and output length samples")

    def workload(self, n: int, rate: float | None = None) -> SimWorkload:
        rate = rate or self.rate
        rng = np.random.default_rng(self.seed)
        gaps = rng.gamma(self.burstiness, 1.0 / (rate * self.burstiness), n)
        idx = np.arange(n) % len(self.prompt_len)
        blocks = None
        if self.prefix_blocks is not None:  # each pass over the sample is new traffic: it shares nothing with the last
            blocks = [tuple((i // len(self.prompt_len), b) for b in self.prefix_blocks[j]) for i, j in enumerate(idx)]
        return SimWorkload(np.concatenate([[0.0], np.cumsum(gaps[:-1])]), self.prompt_len[idx], self.output_len[idx],
                           blocks, self.block_tokens)

    @property
    def mean_output(self) -> float:
        return float(np.mean(self.output_len))


@dataclass
class Candidate:
    layout: str  # "disaggregated" or "aggregated"
    pools: list[tuple[str, int, str, int]]  # (role, workers, hardware kind, units per worker)
    deployment: Deployment = field(repr=False)
    price_per_hour: float
    units: int
    attainment: float = 0.0
    ttft_p90: float | None = None
    tpot_p90: float | None = None
    goodput: float | None = None  # req/s at which the layout still meets the attainment target
    goodput_is_lower_bound: bool = False  # it met the target even at the search's ceiling (8x the rate)
    cost_per_million_output: float = 0.0
    cached_share: float = 0.0  # of the simulated prompt tokens, found in a worker's prefix cache

    def describe(self) -> str:
        return " + ".join(f"{n} {role} x {units} {kind}" if units > 1 else f"{n} {role} on {kind}"
                          for role, n, kind, units in self.pools)

    def to_json(self) -> dict:
        return {"layout": self.layout, "pools": [{"role": r, "workers": n, "hardware": k, "units_per_worker": u}
                                                 for r, n, k, u in self.pools],
                "price_per_hour": self.price_per_hour, "units": self.units, "attainment": self.attainment,
                "ttft_p90_s": self.ttft_p90, "tpot_p90_s": self.tpot_p90, "goodput_req_s": self.goodput,
                "goodput_is_lower_bound": self.goodput_is_lower_bound,
                "cost_per_million_output_tokens": self.cost_per_million_output,
                "cached_prompt_share": self.cached_share}


class Planner:
    def __init__(self, profiles: dict[str, Profile], catalog: Catalog, traffic: Traffic, slo: SLO,
                 attainment: float = 0.9, sim_requests: int = 3000, local_prefill_threshold: int = 16,
                 max_units: int | None = None, budget_per_hour: float | None = None, progress: bool = False,
                 host_kv_gib: float = 0.0) -> None:
        if slo.ttft is None and slo.tpot is None and slo.e2e is None:
            raise ValueError("give at least one latency target (TTFT, TPOT or E2E)")
        self.host = {kind: host_tier_tokens(p, host_kv_gib) for kind, p in profiles.items()}  # a host tier per worker
        self.profiles = profiles  # kind name -> profile for one worker of that kind
        self.catalog = catalog
        self.traffic = traffic
        self.slo = slo
        self.attainment = attainment
        self.n = sim_requests
        self.threshold = local_prefill_threshold
        self.max_units = max_units
        self.budget = budget_per_hour
        self.progress = progress
        self.simulations = 0
        self._work = traffic.workload(sim_requests)

    # --- one simulation --------------------------------------------------------------------------
    def _price(self, kind: str) -> float:
        return self.profiles[kind].units * self.catalog[kind].price_per_hour

    def deployment(self, pools: list[tuple[str, int, str]]) -> Deployment:
        return Deployment(tuple(Pool(role, n, self.profiles[kind], self._price(kind), self.host[kind])
                                for role, n, kind in pools if n), local_prefill_threshold=self.threshold)

    def run(self, pools: list[tuple[str, int, str]], work: SimWorkload | None = None) -> SimResult:
        return self.simulate(self.deployment(pools), work)

    def simulate(self, dep: Deployment, work: SimWorkload | None = None) -> SimResult:
        self.simulations += 1
        return simulate(dep, work or self._work)

    def fractions(self, result: SimResult) -> tuple[float, float, float]:
        """(all SLOs, TTFT alone, TPOT alone) attainment after warm-up."""
        skip = int(len(result.ttft) * WARMUP)
        s = self.slo
        return (float(met_slo(result, s, skip).mean()),
                float(met_slo(result, SLO(ttft=s.ttft), skip).mean()),
                float(met_slo(result, SLO(tpot=s.tpot, e2e=s.e2e), skip).mean()))

    def idle(self, kind: str, n: int = 300) -> tuple[float, float | None, float | None]:
        """(share meeting the SLOs, p90 TTFT, p90 TPOT) of the traffic's first ``n`` requests sent one at a time to
        one aggregated worker of ``kind``: the best any fleet of it can do; below the attainment, no count helps."""
        w = self._work.subset(np.arange(min(n, len(self._work))))
        w = SimWorkload(np.arange(len(w)) * 1e4, w.prompt_len, w.output_len, w.prefix_blocks, w.block_tokens)
        result = simulate(self.deployment([("both", 1, kind)]), w)
        tpot = result.tpot[~np.isnan(result.tpot)]
        return (float(met_slo(result, self.slo).mean()), float(np.percentile(result.ttft, 90)),
                float(np.percentile(tpot, 90)) if len(tpot) else None)

    # --- sizing ----------------------------------------------------------------------------------
    def _fewest(self, ok, cap: int) -> int | None:
        """Smallest count in 1..cap for which ok(count), assuming ok is monotone."""
        lo, hi = 0, 1  # ok(lo) is False (or lo == 0)
        while not ok(hi):
            if hi >= cap:
                return None
            lo, hi = hi, min(cap, hi * 2)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def _cap(self, kind: str) -> int:
        units = self.profiles[kind].units
        return max(1, (self.max_units or 4096) // units)

    def _spare_decoders(self, kind: str) -> int:
        """Enough decode workers that each runs a small batch (decode capacity to spare)."""
        p = self.profiles[kind]
        t = self.traffic
        ctx = float(np.mean(t.prompt_len)) + t.mean_output / 2
        busy = t.rate * t.mean_output * p.decode(4, 4 * ctx) / 4  # requests in decode at batch ~4
        return min(self._cap(kind), max(2, math.ceil(busy / 4) * 2))

    def _spare_prefillers(self, kind: str) -> int:
        p = self.profiles[kind]
        lens = self.traffic.prompt_len
        busy = self.traffic.rate * float(np.mean([p.prefill(l, l * l) for l in lens[:500]]))
        return min(self._cap(kind), max(2, math.ceil(busy * 3)))

    def fewest_prefill(self, kind: str) -> int | None:
        spare = self._spare_decoders(kind)
        return self._fewest(lambda n: self.fractions(self.run([("prefill", n, kind), ("decode", spare, kind)]))[1]
                            >= self.attainment, self._cap(kind))

    def fewest_decode(self, kind: str) -> int | None:
        spare = self._spare_prefillers(kind)
        return self._fewest(lambda n: self.fractions(self.run([("prefill", spare, kind), ("decode", n, kind)]))[2]
                            >= self.attainment, self._cap(kind))

    def fewest_aggregated(self, kind: str) -> int | None:
        return self._fewest(lambda n: self.fractions(self.run([("both", n, kind)]))[0] >= self.attainment,
                            self._cap(kind))

    def size_pair(self, pk: str, p0: int, dk: str, d0: int) -> tuple[int, int] | None:
        p, d = p0, d0
        for _ in range(40):
            if self._over_limits([("prefill", p, pk), ("decode", d, dk)]):
                return None
            both, ttft_ok, tpot_ok = self.fractions(self.run([("prefill", p, pk), ("decode", d, dk)]))
            if both >= self.attainment:
                return p, d
            if ttft_ok - self.attainment <= tpot_ok - self.attainment:
                p += max(1, p // 10)
            else:
                d += max(1, d // 10)
        return None

    def _over_limits(self, pools: list[tuple[str, int, str]]) -> bool:
        dep = self.deployment(pools)
        return (self.max_units is not None and dep.units > self.max_units) or \
               (self.budget is not None and dep.price_per_hour > self.budget)

    def candidate(self, layout: str, pools: list[tuple[str, int, str]]) -> Candidate:
        dep = self.deployment(pools)
        result = self.simulate(dep)
        skip = int(len(result.ttft) * WARMUP)
        both = self.fractions(result)[0]
        price = dep.price_per_hour
        tokens_per_hour = self.traffic.rate * self.traffic.mean_output * 3600
        ttft = result.ttft[skip:][~result.rejected[skip:]]
        tpot = result.tpot[skip:][~result.rejected[skip:]]
        tpot = tpot[~np.isnan(tpot)]
        return Candidate(layout, [(r, n, k, self.profiles[k].units) for r, n, k in pools if n], dep, price, dep.units,
                         both,
                         float(np.percentile(ttft, 90)) if len(ttft) else None,
                         float(np.percentile(tpot, 90)) if len(tpot) else None,
                         cost_per_million_output=price / tokens_per_hour * 1e6,
                         cached_share=result.stats["cached_prompt_tokens"] / max(1, int(result.prompt_len.sum())))

    def goodput(self, cand: Candidate, steps: int = 6) -> float | None:
        """Highest rate (searched between the target and 8x it) at which the layout meets the target."""
        pools = [(r, n, k) for r, n, k, _ in cand.pools]

        def ok(rate: float) -> bool:
            return self.fractions(self.run(pools, self.traffic.workload(self.n, rate)))[0] >= self.attainment

        lo, hi = self.traffic.rate, self.traffic.rate * 8
        if not ok(lo):
            return None
        if ok(hi):
            return hi
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def search(self, kinds: list[str], top: int = 5, aggregated: bool = True, disaggregated: bool = True
               ) -> list[Candidate]:
        say = (lambda m: print(f"[plan] {m}", file=sys.stderr, flush=True)) if self.progress else (lambda m: None)
        cands: list[Candidate] = []
        pmin, dmin = {}, {}
        for kind in kinds:
            if disaggregated:
                pmin[kind] = self.fewest_prefill(kind)
                dmin[kind] = self.fewest_decode(kind)
                say(f"{kind}: prefill alone needs {pmin[kind]}, decode alone {dmin[kind]} workers")
            if aggregated:
                n = self.fewest_aggregated(kind)
                say(f"{kind}: aggregated needs {n} workers")
                if n is not None and not self._over_limits([("both", n, kind)]):
                    cands.append(self.candidate("aggregated", [("both", n, kind)]))
        for pk in kinds if disaggregated else []:
            for dk in kinds:
                if pmin.get(pk) is None or dmin.get(dk) is None:
                    continue
                sized = self.size_pair(pk, pmin[pk], dk, dmin[dk])
                if sized is not None:
                    cands.append(self.candidate("disaggregated", [("prefill", sized[0], pk), ("decode", sized[1], dk)]))
                    say(f"prefill {pk} + decode {dk}: {sized[0]} + {sized[1]} workers")
        cands = [c for c in cands if c.attainment >= self.attainment]
        cands.sort(key=lambda c: (c.price_per_hour, c.units))
        best = cands[:top]
        for c in best:
            c.goodput = self.goodput(c)
            c.goodput_is_lower_bound = c.goodput is not None and c.goodput >= self.traffic.rate * 8
        say(f"{self.simulations} simulations")
        return best


def profiles_for(base: list[Profile], catalog: Catalog, kinds: list[str] | None, units: int = 1,
                 ) -> tuple[dict[str, Profile], list[str]]:
    """One profile per kind: a measured one where given, else projected from the first measured profile
    whose hardware is in the catalog. Kinds the model does not fit are left out, with a note. Unless ``kinds``
    names them, kinds of another device class than every measured profile's (a GPU from CPU profiles) are left
    out too: a step's software overhead is the measured host's, so such a projection is far off (docs/planner.md:
    an H200 projected from this CPU at 33 ms a decode step, measured 12.4 ms)."""
    measured = {p.hardware: p for p in base}
    source = next((p for p in base if p.hardware in catalog), None)
    out, notes = {}, []
    classes = {catalog[p.hardware].device for p in base if p.hardware in catalog}
    todo = kinds or list(catalog.kinds)
    if not kinds and classes:
        other = [k for k in todo if k not in measured and catalog[k].device not in classes]
        todo = [k for k in todo if k not in other]
        if other:
            notes.append(f"{', '.join(other)} left out: the profiles were measured on {' and '.join(sorted(classes))} "
                         "only, and a projection to another device class keeps the measured host's per-step "
                         "overhead (far off); profile one of them, or name kinds with --hardware to project anyway")
    for kind in todo:
        if kind in measured:
            out[kind] = measured[kind]
            continue
        if source is None:
            raise ValueError(f"no profile for {kind} and none to project from: profile hardware must be a catalog "
                             f"name (tokenworks profile --hardware NAME); catalog has {', '.join(catalog.kinds)}")
        try:
            out[kind] = project(source, catalog, kind, units)
        except ValueError as e:
            notes.append(f"{kind} left out: {e}")
            continue
        if classes and catalog[kind].device not in classes:
            notes.append(f"{kind} projected by roofline from a {catalog[source.hardware].device} profile: the "
                         "step's software overhead is another host's, so its figures are likely far off")
    return out, notes
