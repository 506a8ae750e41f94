"""Prompt chunks beside decodes: the engine's cap on prompt tokens per step while requests decode, against none.

Starts the real server (the built-in model, the layout `serve` picks here) with the default cap and with
`--prefill-tokens-while-decoding 0` (a prompt then takes the whole `--max-num-batched-tokens` budget beside the
decodes), alternated over rounds, and drives each with `tokenworks bench` (synthetic prompts of 50-400 words,
64-token outputs) at each concurrency, plus one long prompt at a time (no decodes beside it: the cap must not
apply). Prints the medians over rounds and each figure's ratio cap / none.

    python benchmarks/prefill_cap.py [--concurrency 4,16] [--rounds 2] [--requests-per-stream 6]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.serving import Server  # noqa: E402  (the tests' helper: a real server on 127.0.0.1, stopped by pid)

SETTINGS = {"none": ["--prefill-tokens-while-decoding", "0"], "cap": []}


def bench(url: str, concurrency: int, requests: int, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "tokenworks.cli", "bench", "--url", url, "--concurrency",
                        str(concurrency), "--num-requests", str(requests), "--seed", str(seed), "--out", out, *extra],
                       check=True, capture_output=True, text=True)
        with open(os.path.join(out, "summary.json")) as f:
            run = json.load(f)["runs"]["server"][0]
    return {"TTFT p50 ms": run["ttft_s"]["median"] * 1e3, "TTFT p99 ms": run["ttft_s"]["p99"] * 1e3,
            "ITL p99 ms": run["itl_s"]["p99"] * 1e3, "tok/s": run["output_token_throughput"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="4,16", help="streams, comma-separated (default: 4,16)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-per-stream", type=int, default=6)
    ap.add_argument("--long-prompt", type=int, default=1500, help="words of the lone long prompt (0: skip)")
    ns = ap.parse_args()
    levels = [int(c) for c in ns.concurrency.split(",")]
    cases = [(f"{c} streams", c, ["--output-len", "64"]) for c in levels]
    if ns.long_prompt:
        cases.append((f"1 x {ns.long_prompt} words", 1, ["--input-len", str(ns.long_prompt), "--output-len", "8"]))
    figures: dict = {}  # (case, setting) -> figure -> [per round]
    for r in range(ns.rounds):
        for setting, flags in SETTINGS.items():
            server = Server(*flags)
            try:
                for case, c, extra in cases:
                    got = bench(server.url, c, c * ns.requests_per_stream if c > 1 else 6, r + 1, extra)
                    for k, v in got.items():
                        figures.setdefault((case, setting), {}).setdefault(k, []).append(v)
                    print(f"round {r + 1} {setting:<4} {case:<18} " + "  ".join(f"{k} {v:7.1f}" for k, v in got.items()),
                          flush=True)
            finally:
                server.stop()
    print(f"\nmedians over {ns.rounds} rounds; cap / none")
    for case, _, _ in cases:
        parts = []
        for k in figures[(case, "cap")]:
            cap, none = (statistics.median(figures[(case, s)][k]) for s in ("cap", "none"))
            parts.append(f"{k} {none:.1f} -> {cap:.1f} ({cap / none:.2f}x)")
        print(f"{case:<18} " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
