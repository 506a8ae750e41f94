"""The router's own CPU per delivered token, without an engine: the real router and HTTP API (uvicorn, the same as
`tokenworks serve` runs) in one process, a stand-in worker in another that answers every submitted request with one
token per step (all requests in one `Outputs` message, as a worker does), and the real load generator as the client.
The bare uvicorn floor (``bare_sse.py``) is measured in the same run. With no engine to wait on, the figures move
far less between runs than ``serving_path.py``'s, which makes this the benchmark to A/B the router's hot path.

    python benchmarks/router_path.py [--model PATH] [--concurrency 64] [--output-len 128] [--step 0.02] [--rounds 3]
                                     [--waves 4]
    python benchmarks/router_path.py --output-len 1 --requests 2000 --step 0.002   # the cost of a request itself

Each line also gives the CPU per request (the per-token figure times the output length): with one-token outputs
that is what a request costs the router besides its tokens (parsing, tokenizing, placing, the response's start
and end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORKER_ID = "stand-in-0"


def stand_in_worker(events_endpoint: str, commands_port: int, step: float) -> None:
    """Answers Submits with one token per step per request (token ids of a fixed text); Aborts drop a request."""
    import zmq

    from tokenworks.codec import Codec
    from tokenworks.worker import protocol as P

    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(events_endpoint)
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{commands_port}")
    to_router, from_router = Codec(P.FromWorker), Codec(P.ToWorker)
    text_ids = list(range(300, 812))  # ordinary vocabulary ids
    active: dict[str, list] = {}  # request id -> [tokens sent, max tokens, prompt length]
    push.send(to_router.encode(P.Ready(WORKER_ID, "both", os.getpid(), "stand-in", f"tcp://127.0.0.1:{commands_port}",
                                       max_model_len=4096, block_size=16, num_blocks=100_000, kv_peer=None, cpus=[],
                                       load_seconds=0.0)))
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    next_step = next_stats = time.monotonic()
    parent = os.getppid()
    while os.getppid() == parent:  # ends with the router process that started it
        timeout = max(0.0, next_step - time.monotonic())
        if poller.poll(timeout * 1000):
            while True:
                try:
                    msg = from_router.decode(pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, P.Submit):
                    active[msg.request_id] = [0, msg.params.max_tokens, len(msg.prompt_token_ids)]
                elif isinstance(msg, P.Abort):
                    active.pop(msg.request_id, None)
                elif isinstance(msg, P.Shutdown):
                    return
            continue
        now = time.monotonic()
        next_step = now + step
        outs = []
        for rid, st in list(active.items()):
            st[0] += 1
            done = st[0] >= st[1]
            outs.append(P.Output(rid, [text_ids[st[0] % len(text_ids)]], done, "length" if done else None, st[2], 0))
            if done:
                del active[rid]
        if outs:
            push.send(to_router.encode(P.Outputs(WORKER_ID, outs)))
        if now >= next_stats:
            next_stats = now + 1.0
            push.send(to_router.encode(P.Stats(WORKER_ID, len(active), 0, 0, 0, 0, 100_000, 0, 0, idle=not active)))


def serve(port: int, step: float, model: str | None) -> None:
    """The router and its HTTP API, as `tokenworks serve` builds them, with the stand-in worker behind it."""
    import uvicorn

    from tokenworks.model.weights import load_tokenizer_files
    from tokenworks.router.api import create_app
    from tokenworks.router.router import Router
    from tokenworks.tokenizer import Tokenizer
    from tests.serving import free_port

    files = load_tokenizer_files(model)
    tokenizer = Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token,
                          files.add_bos_token)

    async def main() -> None:
        router = Router(block_size=16, local_prefill_threshold=16, tokenizer=tokenizer)
        router.start()
        router.expect(WORKER_ID)
        worker = subprocess.Popen([sys.executable, __file__, "--worker", router.events_endpoint, str(free_port()),
                                   "--step", str(step)])
        try:
            while WORKER_ID not in router.workers:
                await asyncio.sleep(0.05)
            app = create_app(router, tokenizer, "stand-in")
            await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve()
        finally:
            worker.kill()
            worker.wait()

    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # the finally above stops the stand-in worker
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main())
        except KeyboardInterrupt:
            pass


def measure(concurrency: int, output_len: int, step: float, model: str | None = None, client_processes: int = 1,
            requests: int | None = None):
    """The router process's CPU microseconds per delivered token, and the tokens/s delivered, under
    ``concurrency`` closed-loop streams, ``requests`` in all (default: one per stream); a ``bare_sse.ServerLoad``."""
    from benchmarks.bare_sse import server_cpu_per_token
    from tests.serving import free_port
    from tokenworks.bench.workloads import synthetic

    port = free_port()
    return server_cpu_per_token([sys.executable, __file__, "--serve", str(port), "--step", str(step),
                                 *(["--model", model] if model else [])], f"http://127.0.0.1:{port}",
                                synthetic(requests or concurrency, "uniform:20:60", f"fixed:{output_len}", seed=3),
                                concurrency,
                                client_processes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step", type=float, default=0.02, help="the stand-in worker's step, seconds (default: 0.02)")
    ap.add_argument("--model", default=None, help="whose tokenizer the router uses (default: the built-in model)")
    ap.add_argument("--rounds", type=int, default=3, help="router and floor runs, alternated (default: 3)")
    ap.add_argument("--waves", type=int, default=4,
                    help="requests per stream in each run (default: 4; one wave of 64 x 128 tokens is about 0.2 s of "
                         "router CPU, and single runs of it read 16-34 us a token on one machine within minutes)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per run (default: waves x concurrency); many short ones measure a request's own "
                         "cost")
    ap.add_argument("--client-processes", type=int, default=None,
                    help="load generator processes (default: 1 on up to 4 cores, else up to 4)")
    ap.add_argument("--serve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, default=None, metavar=("EVENTS", "PORT"), help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        stand_in_worker(ns.worker[0], int(ns.worker[1]), ns.step)
        return 0
    if ns.serve is not None:
        serve(ns.serve, ns.step, ns.model)
        return 0
    from benchmarks import bare_sse
    from tokenworks.bench.loadgen import default_client_processes

    clients = ns.client_processes or default_client_processes()
    requests = ns.requests or ns.waves * ns.concurrency
    router, floor = [], []
    for _ in range(ns.rounds):
        router.append(measure(ns.concurrency, ns.output_len, ns.step, ns.model, clients, requests))
        floor.append(bare_sse.measure(ns.concurrency, ns.output_len, ns.step, clients, requests))
    med, runs = statistics.median, lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    r, f = med(x.us_per_token for x in router), med(x.us_per_token for x in floor)
    print(f"{requests} requests in {ns.concurrency} streams of {ns.output_len} tokens, step "
          f"{ns.step * 1e3:g} ms, {ns.rounds} rounds: router CPU {r:.0f} us/token (runs "
          f"{runs(x.us_per_token for x in router)}), bare uvicorn floor {f:.0f} (runs "
          f"{runs(x.us_per_token for x in floor)}), router/floor {f'{r / f:.2f}' if f else 'n/a'}")
    print(f"CPU per request: router {r * ns.output_len / 1e3:.2f} ms, bare floor {f * ns.output_len / 1e3:.2f} ms")
    print(f"tokens/s delivered: router {med(x.tokens_per_s for x in router):.0f} (runs "
          f"{runs(x.tokens_per_s for x in router)}), bare floor {med(x.tokens_per_s for x in floor):.0f}; offered "
          f"{ns.concurrency / ns.step:.0f} (one token per stream per step); {clients} client process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
