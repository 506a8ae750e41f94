"""Summaries of a run: latency percentiles, throughput, SLO attainment, goodput."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenworks.bench.client import RequestResult


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None = no target. A request meets the SLO when it succeeded and
    its TTFT, TPOT and E2E are within target and every one of its inter-token gaps is within the ITL target."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None
    e2e: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft is not None and (r.ttft is None or r.ttft > self.ttft):
            return False
        if self.tpot is not None and r.tpot is not None and r.tpot > self.tpot:
            return False
        if self.itl is not None and r.itls and max(r.itls) > self.itl:
            return False
        if self.e2e is not None and (r.e2e is None or r.e2e > self.e2e):
            return False
        return True

    def describe(self) -> str:
        parts = [f"{n} <= {v * 1000:g} ms" for n, v in (("TTFT", self.ttft), ("TPOT", self.tpot), ("ITL", self.itl),
                                                        ("E2E", self.e2e)) if v is not None]
        return ", ".join(parts) or "none"


def stats(values) -> dict[str, float | None]:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


NOT_SENT = "not sent"  # the error of a request a --max-duration cut before it was sent


def summarize(results: list[RequestResult], wall: float, slo: SLO, price_per_hour: float | None = None) -> dict:
    """The summary of the requests that were sent; those never sent are counted apart (``not_sent``), not as
    failures or SLO misses."""
    sent = [r for r in results if not (r.error or "").startswith(NOT_SENT)]
    ok = [r for r in sent if r.ok]
    errors: dict[str, int] = {}
    error_after: dict[str, float] = {}  # the slowest answer of each kind of error, seconds
    for r in sent:
        if not r.ok:
            key = r.error.split(":")[0] if r.error else "error"
            errors[key] = errors.get(key, 0) + 1
            if r.error_after is not None:
                error_after[key] = max(error_after.get(key, 0.0), r.error_after)
    s = summary(
        requests=len(sent), errors=errors, wall=wall, slo=slo, met=sum(1 for r in sent if slo.met(r)),
        input_tokens=sum(r.prompt_tokens for r in ok), output_tokens=sum(r.output_tokens for r in ok),
        ttft=[r.ttft for r in ok if r.ttft is not None], tpot=[r.tpot for r in ok if r.tpot is not None],
        itl=[x for r in ok for x in r.itls], e2e=[r.e2e for r in ok if r.e2e is not None],
        price_per_hour=price_per_hour,
        cached_tokens=sum(r.cached_tokens for r in ok if r.cached_tokens is not None)
        if any(r.cached_tokens is not None for r in ok) else None)
    s["not_sent"] = len(results) - len(sent)
    s["error_after_max_s"] = error_after
    return s


def summary(*, requests: int, errors: dict[str, int], wall: float, slo: SLO, met: int, input_tokens: int,
            output_tokens: int, ttft, tpot, itl, e2e, price_per_hour: float | None,
            cached_tokens: int | None = None) -> dict:
    """The summary of one run, from latencies of the completed requests (lists or arrays, seconds).
    Measured runs (``summarize``) and simulated ones (``planner.report``) both come through here.
    ``cached_tokens``: prompt tokens found in the prefix cache (None: the server did not say)."""
    completed = requests - sum(errors.values())
    s = {
        "requests": requests,
        "completed": completed,
        "failed": requests - completed,
        "errors": errors,
        "duration_s": wall,
        "request_throughput": completed / wall if wall else 0.0,
        "output_token_throughput": output_tokens / wall if wall else 0.0,
        "input_tokens": int(input_tokens),
        "output_tokens": int(output_tokens),
        "cached_prompt_tokens": None if cached_tokens is None else int(cached_tokens),
        "ttft_s": stats(ttft),
        "tpot_s": stats(tpot),
        "itl_s": stats(itl),
        "e2e_s": stats(e2e),
        "slo": slo.describe(),
        "slo_attainment": met / requests if requests else 0.0,
        "good_request_throughput": met / wall if wall else 0.0,
    }
    if price_per_hour is not None and output_tokens:
        s["price_per_hour"] = price_per_hour
        s["cost_per_million_output_tokens"] = cost_per_million(price_per_hour, wall, output_tokens)
    return s


def cost_per_million(price_per_hour: float, seconds: float, tokens: float) -> float:
    """Dollars per million tokens when ``tokens`` took ``seconds`` of a fleet priced ``price_per_hour``."""
    return price_per_hour * (seconds / 3600) / tokens * 1e6


def goodput(sweep: list[tuple[float, dict]], attainment: float) -> float | None:
    """The highest rate whose run had at least ``attainment`` of its requests meeting every SLO."""
    passing = [rate for rate, s in sweep if s["slo_attainment"] >= attainment]
    return max(passing) if passing else None


def best_passing(sweep: list[tuple[float, dict]], attainment: float) -> dict | None:
    """The summary of the highest load level that met the attainment target (None: none did)."""
    passing = [(x, s) for x, s in sweep if s["slo_attainment"] >= attainment]
    return max(passing, key=lambda p: p[0])[1] if passing else None


def describe_goodput(best: dict | None) -> str:
    """Goodput as a reader should see it: an offered rate, or a concurrency and the rate it achieved."""
    if best is None:
        return "none"
    if best["load"].startswith("concurrency"):
        return f"{best['load']} ({best['request_throughput']:.3g} req/s measured)"
    return f"{best['load'].split(' req/s')[0]} req/s" if " req/s" in best["load"] else \
        f"{best['request_throughput']:.3g} req/s measured ({best['load']})"
