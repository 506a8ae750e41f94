"""Writing a run: per-request JSONL, a JSON summary, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import os

from tokenworks.bench.client import RequestResult


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def write_report(out_dir: str, title: str, runs: dict[str, list[tuple[float, dict, list[RequestResult]]]], slo,
                 attainment: float, notes: list[str], extra: dict | None = None, with_plots: bool = True) -> dict:
    """summary.json, report.md and (``with_plots``) the PNG plots of a session: per target, a list of
    (load, summary, per-request results). Measured (``bench.sweep``) and simulated
    (``planner.simulator``) sessions write the same files."""
    from tokenworks.bench.metrics import best_passing, describe_goodput

    best = {name: best_passing([(x, s) for x, s, _ in sweep], attainment) for name, sweep in runs.items()}
    # Open loop: the offered rate that passed; closed loop: the request rate measured at the concurrency that passed.
    goodputs = {name: None if b is None else (x_of(runs[name], b) if "req/s" in b["load"] else b["request_throughput"])
                for name, b in best.items()}
    labels = {name: describe_goodput(b) for name, b in best.items()}
    doc = {"title": title, "slo": slo.describe(), "attainment_target": attainment, "goodput_req_s": goodputs,
           "goodput": labels,
           **(extra or {}), "runs": {name: [s for _, s, _ in sweep] for name, sweep in runs.items()}}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(doc, f, indent=2)
    md = markdown(title, {n: [(s["load"], s) for _, s, _ in sweep] for n, sweep in runs.items()}, labels,
                  notes + [f"SLOs: {slo.describe()}; goodput = highest load with at least {attainment:.0%} of requests "
                           "meeting every SLO"])
    if with_plots:
        written = plots(out_dir, runs, attainment)
        md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in written) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    doc["report"] = os.path.join(out_dir, "report.md")
    return doc


def _cost(s: dict) -> str:
    c = s.get("cost_per_million_output_tokens")
    return "-" if c is None else f"{c:.3g}"


def write_requests(path: str, results: list[RequestResult]) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps(r.to_json()) + "\n")


def x_of(sweep, summary: dict) -> float:
    """The load level (rate or concurrency) a summary of ``sweep`` ran at."""
    return next(x for x, s, _ in sweep if s is summary)


def markdown(title: str, runs: dict[str, list[tuple[float, dict]]], goodputs: dict[str, str],
             notes: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes] + [""]
    for name, sweep in runs.items():
        lines.append(f"## {name}: goodput {goodputs.get(name, 'none')}")
        lines.append("")
        lines.append("| load | done/sent | req/s | out tok/s | TTFT med / p90 / p99 ms | TPOT med / p90 ms | "
                     "ITL med / p99 ms | E2E med ms | SLO met | $ / M out tok |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, s in sweep:
            t, p, i, e = s["ttft_s"], s["tpot_s"], s["itl_s"], s["e2e_s"]
            lines.append(
                f"| {label} | {s['completed']}/{s['requests']} | {s['request_throughput']:.2f} | "
                f"{s['output_token_throughput']:.1f} | {_ms(t['median'])} / {_ms(t['p90'])} / {_ms(t['p99'])} | "
                f"{_ms(p['median'])} / {_ms(p['p90'])} | {_ms(i['median'])} / {_ms(i['p99'])} | {_ms(e['median'])} | "
                f"{s['slo_attainment']:.0%} | {_cost(s)} |")
            if s.get("cached_prompt_tokens") is not None and s["input_tokens"]:
                lines.append(f"| prefix cache | {s['cached_prompt_tokens']:,} of {s['input_tokens']:,} prompt tokens "
                             f"cached ({s['cached_prompt_tokens'] / s['input_tokens']:.0%}) | | | | | | | | |")
            if s.get("not_sent"):
                lines.append(f"| not sent | {s['not_sent']} (the time limit came first; not counted above) "
                             "| | | | | | | | |")
            if s["errors"]:
                after = s.get("error_after_max_s", {})
                lines.append("| errors | " + ", ".join(
                    f"{k}: {v}" + (f" (answered within {after[k]:.2f} s)" if k in after else "")
                    for k, v in s["errors"].items()) + " | | | | | | | | |")
        lines.append("")
    return "\n".join(lines)


def plots(out_dir: str, runs: dict[str, list[tuple[float, dict, list[RequestResult]]]], attainment: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, sweep in runs.items():
        rate, _, results = sweep[-1]
        ok = [r for r in results if r.ok]
        for ax, values, label in ((axes[0], [r.ttft for r in ok if r.ttft], "TTFT"),
                                  (axes[1], [r.tpot for r in ok if r.tpot], "TPOT"),
                                  (axes[2], [x for r in ok for x in r.itls], "ITL")):
            if values:
                v = np.sort(np.asarray(values) * 1000)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=f"{name} @ {rate:g}")
                ax.set_xlabel(f"{label} (ms)")
                ax.set_ylabel("fraction of requests" if label != "ITL" else "fraction of gaps")
                ax.set_xscale("log")
                ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency CDFs at the highest load of each run")
    written.append(_save(plt, fig, out_dir, "latency_cdf.png"))

    if any(len(s) > 1 for s in runs.values()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, sweep in runs.items():
            rates = [r for r, _, _ in sweep]
            axes[0].plot(rates, [s["slo_attainment"] for _, s, _ in sweep], marker="o", label=name)
            axes[1].plot(rates, [s["good_request_throughput"] for _, s, _ in sweep], marker="o", label=name)
        axes[0].axhline(attainment, color="gray", linestyle="--", linewidth=1)
        axes[0].set_ylabel("SLO attainment")
        axes[1].set_ylabel("requests/s meeting every SLO")
        for ax in axes:
            ax.set_xlabel("offered load (req/s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(plt, fig, out_dir, "goodput.png"))

    fig, ax = plt.subplots(figsize=(11, 4))
    for name, sweep in runs.items():
        _, _, results = sweep[-1]
        xs, ys = [], []
        for r in results:
            for t, gap in zip(r.token_times[1:], r.itls):
                xs.append(t)
                ys.append(gap * 1000)
        ax.scatter(xs, ys, s=3, alpha=0.5, label=name)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("inter-token gap (ms)")
    ax.set_yscale("log")
    ax.set_title("ITL timeline at the highest load (stalls show as spikes)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out_dir, "itl_timeline.png"))
    return written


def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
