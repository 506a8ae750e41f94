"""A benchmark session: one or more servers, one or more loads each, written out as a report."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

from tokenworks.bench import workloads as W
from tokenworks.bench.client import RequestResult
from tokenworks.bench.loadgen import Load, drive
from tokenworks.bench.metrics import SLO, summarize
from tokenworks.bench.report import write_report, write_requests


@dataclass
class Target:
    name: str
    url: str
    model: str | None = None
    price_per_hour: float | None = None


def build_workload(ns) -> tuple[list[W.BenchRequest], list[W.TraceProblem]]:
    n = ns.num_requests
    kind = ns.workload
    if kind == "synthetic":
        return W.synthetic(n, ns.input_len, ns.output_len, ns.seed), []
    if kind == "shared-prefix":
        return W.shared_prefix(n, ns.num_prefixes, ns.prefix_len, ns.input_len, ns.output_len, ns.seed), []
    if kind == "mixed":
        return W.mixed(n, ns.seed), []
    if kind == "multi-turn":
        return W.multi_turn(n, ns.turns, ns.session_rate, ns.think_time, ns.num_prefixes, ns.prefix_len,
                            ns.input_len, ns.output_len, ns.seed), []
    if not ns.file:
        raise W.WorkloadError(f"--workload {kind} needs --file")
    if kind == "sharegpt":
        return W.sharegpt_file(ns.file, n, ns.seed), []
    if kind == "mooncake":
        return W.mooncake_jsonl(ns.file, n, ns.time_scale, length_scale=ns.length_scale)
    if kind == "azure":
        return W.azure_csv(ns.file, n, ns.time_scale, length_scale=ns.length_scale)
    raise W.WorkloadError(f"unknown workload {kind!r}")


def loads_from(ns) -> list[Load]:
    if ns.concurrency:
        return [Load(concurrency=c, seed=ns.seed) for c in ns.concurrency]
    if ns.rates:
        return [Load(rate=r, burstiness=ns.burstiness, seed=ns.seed) for r in ns.rates]
    return [Load()]  # the trace's own timing


def client_cpu_seconds() -> float:
    """CPU seconds of this process and of its ended children (the client processes of ``drive``)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_session(targets: list[Target], requests: list[W.BenchRequest], loads: list[Load], slo: SLO,
                attainment: float, out_dir: str, api: str, timeout: float, max_duration: float | None,
                title: str, notes: list[str], quiet: bool = False, headers: dict | None = None,
                client_processes: int = 1) -> dict:
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    runs: dict[str, list[tuple[float, dict, list[RequestResult]]]] = {}
    for target in targets:
        runs[target.name] = []
        for k, load in enumerate(loads):
            bar = tqdm(total=len(requests), desc=f"{target.name} @ {load.describe()}", unit="req", disable=quiet,
                       file=sys.stderr)

            def progress(res: RequestResult) -> None:
                bar.update(1)
                if not res.ok:
                    bar.set_postfix_str(f"last error: {res.error[:40]}")

            cpu0 = client_cpu_seconds()
            results, wall = drive(target.url, requests, load, processes=client_processes, api=api,
                                  model=target.model, timeout=timeout, max_duration=max_duration, progress=progress,
                                  headers=headers)
            bar.close()
            summary = summarize(results, wall, slo, target.price_per_hour)
            # The load generator's share of its cores: near 1, the figures may be the client's limit, not the server's.
            summary["client_cpu_busy"] = (client_cpu_seconds() - cpu0) / wall / client_processes if wall else 0.0
            summary["load"] = load.describe()
            x = load.rate or load.concurrency or (len(requests) / wall if wall else 0.0)
            runs[target.name].append((x, summary, results))
            safe = target.name.replace(" ", "_").replace("/", "_")
            write_requests(os.path.join(out_dir, f"requests-{safe}-{k}.jsonl"), results)
    return write_report(out_dir, title, runs, slo, attainment, notes)
