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


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(results: list[RequestResult], wall: float, slo: SLO, price_per_hour: float | None = None) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error.split(":")[0] if r.error else "error"
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    met = sum(1 for r in results if slo.met(r))
    s = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration_s": wall,
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_token_throughput": out_tokens / wall if wall else 0.0,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_s": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": stats([x for r in ok for x in r.itls]),
        "e2e_s": stats([r.e2e for r in ok if r.e2e is not None]),
        "slo": slo.describe(),
        "slo_attainment": met / len(results) if results else 0.0,
        "good_request_throughput": met / wall if wall else 0.0,
    }
    if price_per_hour is not None and out_tokens:
        s["cost_per_million_output_tokens"] = price_per_hour * (wall / 3600) / out_tokens * 1e6
    return s


def goodput(sweep: list[tuple[float, dict]], attainment: float) -> float | None:
    """The highest rate whose run had at least ``attainment`` of its requests meeting every SLO."""
    passing = [rate for rate, s in sweep if s["slo_attainment"] >= attainment]
    return max(passing) if passing else None
