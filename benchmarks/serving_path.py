"""The serving path against the engine it serves, same machine, same model, same run.

For each concurrency C: the offline engine (``LLM.generate`` on C prompts at once, ``--waves`` times over
different prompts) and one aggregated server worker (same device and threads) under a closed loop of C streams
with the same prompts and output lengths (``ignore_eos``); prints output tokens/s of both and served/offline. (One
wave at one stream is one request of a hundred-odd milliseconds, which a shared machine's hiccup moves by 20 %: so
each run sends at least ``--min-requests``, in more waves where C is small.) Then one stream: the served
inter-token gap (median) against the engine's batch-1 decode step. And the router process's CPU time per
delivered token (user + system, from /proc), the cost of the HTTP/SSE path itself, beside its floor: a bare ASGI
app on the same uvicorn streaming one fixed event per stream per step to the same client (``bare_sse.py``).
The engine and the server take turns over several rounds and the ratios are per round (medians printed): on a
shared machine two runs minutes apart differ by more than the ratios being checked.

    python benchmarks/serving_path.py [--model PATH] [--concurrency 1,16,64] [--output-len 32] [--rounds 3] [--waves 4]
                                        [--min-requests 16]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children), to the nanosecond: the
    process's CPU-time clock (Linux: clock_getcpuclockid's id, ~pid << 3 | 2). /proc/PID/stat counts 10 ms ticks,
    which at one stream of 32 tokens (about 10 ms of router CPU) read 0 or 312 µs a token."""
    try:
        return time.clock_gettime(ctypes.c_int(~pid << 3 | 2).value)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Offline:
    """The engine itself, in this process: ``LLM.generate`` on C prompts at once."""

    def __init__(self, model: str | None, device: str, prompts: list[str], output_len: int) -> None:
        from tokenworks import LLM, SamplingParams

        self.llm = LLM(model=model, device=device)
        self.prompts, self.output_len = prompts, output_len
        self.params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        self.llm.generate(prompts[:2], self.params)  # first-time costs

    def tokens_per_s(self, c: int, waves: int = 1) -> float:
        """Output tokens/s of ``waves`` batches of ``c`` prompts, one after another (the prompts of wave w:
        ``prompts[w * c : (w + 1) * c]``, as ``Served.run`` sends them)."""
        t, tokens = time.perf_counter(), 0
        for w in range(waves):
            res = self.llm.generate(self.prompts[w * c : (w + 1) * c], self.params)
            tokens += sum(len(r.token_ids) for r in res)
        return tokens / (time.perf_counter() - t)

    def step_s(self) -> float:
        """The batch-1 decode step: one request, median time per step after its prefill."""
        from tokenworks import SamplingParams

        engine = self.llm.engine
        engine.add_request("step-probe", self.prompts[0], SamplingParams(temperature=0, max_tokens=self.output_len + 1,
                                                                         ignore_eos=True))
        engine.step()
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        return statistics.median(steps)


class Served:
    """One aggregated worker behind the real server (a subprocess), driven by the real load generator."""

    def __init__(self, model: str | None, device: str, prompts: list[str], output_len: int, flags: list[str],
                 client_processes: int = 1):
        from tests.serving import Server
        from tokenworks.bench.loadgen import Load, drive
        from tokenworks.bench.workloads import BenchRequest

        model_flags = ["--model", model] if model else []
        self.server = Server("--aggregated-workers", "1", "--device", device, *model_flags, *flags,
                             startup_timeout=300)
        self.prompts, self.output_len, self.client_processes = prompts, output_len, client_processes
        warm = [BenchRequest(p, output_len, input_tokens=0) for p in prompts[:2]]
        drive(self.server.url, warm, Load(concurrency=2))

    def run(self, c: int, waves: int = 1) -> dict:
        """A closed loop of ``c`` streams over ``waves * c`` requests (the offline run's prompts)."""
        from tokenworks.bench.loadgen import Load, drive
        from tokenworks.bench.metrics import SLO, summarize
        from tokenworks.bench.workloads import BenchRequest

        reqs = [BenchRequest(p, self.output_len, input_tokens=0) for p in self.prompts[: waves * c]]
        cpu0 = cpu_seconds(self.server.proc.pid)
        results, wall = drive(self.server.url, reqs, Load(concurrency=c), processes=self.client_processes, timeout=600)
        cpu = cpu_seconds(self.server.proc.pid) - cpu0
        s = summarize(results, wall, SLO())
        return {"tokens_s": s["output_token_throughput"], "itl_median_s": s["itl_s"]["median"],
                "router_us_per_token": cpu / max(1, s["output_tokens"]) * 1e6, "failed": s["failed"]}

    def stop(self) -> None:
        self.server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated stream counts (default: 1,16,64)")
    ap.add_argument("--output-len", type=int, default=32, help="tokens per request (default: 32)")
    ap.add_argument("--rounds", type=int, default=3, help="engine and server runs, alternated (default: 3)")
    ap.add_argument("--waves", type=int, default=4,
                    help="requests per stream in each run: the offline engine runs that many batches (default: 4)")
    ap.add_argument("--min-requests", type=int, default=16,
                    help="at least this many requests a run, in more waves at small concurrencies: at one stream four "
                         "requests are half a second, which a shared machine's hiccup moves by 20 %% (default: 16)")
    ap.add_argument("--serve-flags", default="", help="extra flags for the server")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--client-processes", type=int, default=None,
                    help="load generator processes (default: 1 on up to 4 cores, else up to 4: one client core "
                         "parses fewer events a second than a GPU worker can stream)")
    ns = ap.parse_args()
    from tokenworks.bench.loadgen import default_client_processes
    from tokenworks.bench.workloads import synthetic

    clients = ns.client_processes or default_client_processes()

    concurrency = [int(c) for c in ns.concurrency.split(",")]
    waves = {c: max(ns.waves, -(-ns.min_requests // c)) for c in concurrency}
    prompts = [r.prompt for r in synthetic(max(c * w for c, w in waves.items()) + 2, "uniform:20:60", "fixed:1", seed=3)]
    # Rounds alternate the engine and the server at each concurrency (one second apart), so that a slow minute of
    # a shared machine falls on both; the ratios are per round, their median printed.
    off_runner = Offline(ns.model, ns.device, prompts, ns.output_len)
    srv_runner = Served(ns.model, ns.device, prompts, ns.output_len, ns.serve_flags.split(), clients)
    rounds: list[dict] = []
    try:
        for _ in range(ns.rounds):
            r: dict = {"offline": {}, "served": {}}
            for c in concurrency:
                r["offline"][c] = off_runner.tokens_per_s(c, waves[c])
                time.sleep(1)
                r["served"][c] = srv_runner.run(c, waves[c])
                time.sleep(1)
            r["step_s"] = off_runner.step_s()
            rounds.append(r)
    finally:
        srv_runner.stop()
    from benchmarks.bare_sse import measure

    floor = {c: measure(c, ns.output_len, step=0.02, client_processes=clients).us_per_token for c in concurrency}
    med = statistics.median
    print(f"{len(rounds)} rounds of {', '.join(f'{waves[c] * c}' for c in concurrency)} requests, medians; served/offline per round in brackets; {clients} client process(es)")
    print(f"{'streams':>7} | offline tok/s | served tok/s | served/offline | router CPU us/token | bare uvicorn floor"
          " | router/floor")
    for c in concurrency:
        ratios = [r["served"][c]["tokens_s"] / r["offline"][c] for r in rounds]
        router = med(r["served"][c]["router_us_per_token"] for r in rounds)
        failed = sum(r["served"][c]["failed"] for r in rounds)
        print(f"{c:>7} | {med(r['offline'][c] for r in rounds):13.1f} | "
              f"{med(r['served'][c]['tokens_s'] for r in rounds):12.1f} | {med(ratios):14.2f} | {router:19.0f} | "
              f"{floor[c]:18.0f} | {f'{router / floor[c]:.2f}' if floor[c] else 'n/a':>12}   "
              f"[{', '.join(f'{x:.2f}' for x in ratios)}]"
              + (f"   ({failed} failed)" if failed else ""))
    gaps = [r["served"][concurrency[0]]["itl_median_s"] / r["step_s"] for r in rounds]
    print(f"one stream: served token gap {med(r['served'][concurrency[0]]['itl_median_s'] for r in rounds) * 1e3:.1f} "
          f"ms, engine batch-1 step {med(r['step_s'] for r in rounds) * 1e3:.1f} ms, ratio {med(gaps):.2f} "
          f"[{', '.join(f'{x:.2f}' for x in gaps)}]" + ("" if concurrency[0] == 1 else f" (at {concurrency[0]} streams)"))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"rounds": [{"offline": {str(k): v for k, v in r["offline"].items()},
                                   "served": {str(k): v for k, v in r["served"].items()}, "step_s": r["step_s"]}
                                  for r in rounds],
                       "bare_floor_us_per_token": {str(k): v for k, v in floor.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
