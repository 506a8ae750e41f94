"""The floor under the router's CPU per token: a bare ASGI app on the same uvicorn (uvloop, httptools) that streams
one fixed server-sent event per stream per step to the same load generator, with no router, engine or worker behind
it. What the router spends per token beyond this is its own.

    python benchmarks/bare_sse.py [--concurrency 64] [--output-len 128] [--step 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CHUNK = (b'data: {"id":"cmpl-1-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
         b'"text":" word","finish_reason":null,"logprobs":null}]}\n\n')


def make_app(step: float):
    streams: set[asyncio.Queue] = set()

    async def ticker() -> None:  # one "engine step" for every stream at once, as a worker's Outputs message is
        while True:
            await asyncio.sleep(step)
            for q in list(streams):
                q.put_nowait(None)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            asyncio.get_running_loop().create_task(ticker())
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] != "POST":  # GET /health
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        n = json.loads(body)["max_tokens"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        q: asyncio.Queue = asyncio.Queue()
        streams.add(q)
        try:
            for _ in range(n):
                await q.get()
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            streams.discard(q)

    return app


class ServerLoad(NamedTuple):
    us_per_token: float  # the server process's CPU microseconds per delivered token
    tokens_per_s: float  # tokens the client received per second of the run


def server_cpu_per_token(cmd: list[str], url: str, requests: list, concurrency: int,
                         client_processes: int = 1) -> ServerLoad:
    """Start the server ``cmd`` (listening at ``url``), wait for its /health, warm it with two requests, then
    measure its process's CPU microseconds per delivered token (0 for a run shorter than the kernel's CPU clock
    tick, 10 ms) and the tokens delivered per second, while ``requests`` run as ``concurrency`` closed-loop
    streams; every request must complete with all its tokens. The server is stopped after. ``client_processes``:
    see ``tokenworks.bench.loadgen.drive``."""
    import httpx

    from benchmarks.serving_path import cpu_seconds
    from tokenworks.bench.loadgen import Load, drive

    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} did not start")
            time.sleep(0.1)
        drive(url, requests[:2], Load(concurrency=2))  # first-time costs
        cpu0 = cpu_seconds(proc.pid)
        results, wall = drive(url, requests, Load(concurrency=concurrency), processes=client_processes, timeout=300)
        cpu = cpu_seconds(proc.pid) - cpu0
        tokens, expected = sum(r.output_tokens for r in results), sum(r.max_tokens for r in requests)
        failed = sum(not r.ok for r in results)
        if failed or tokens != expected:
            raise RuntimeError(f"{failed} requests failed, {tokens} tokens of {expected}")
        return ServerLoad(cpu / tokens * 1e6, tokens / wall)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(concurrency: int, output_len: int, step: float, client_processes: int = 1,
            requests: int | None = None) -> ServerLoad:
    """The bare server's CPU per delivered token, and its tokens/s, under ``concurrency`` closed-loop streams
    (``requests`` of them in all; default: one per stream)."""
    from tests.serving import free_port
    from tokenworks.bench.workloads import BenchRequest

    port = free_port()
    return server_cpu_per_token([sys.executable, __file__, "--serve", str(port), "--step", str(step)],
                                f"http://127.0.0.1:{port}",
                                [BenchRequest("hello", output_len, input_tokens=0)
                                 for _ in range(requests or concurrency)],
                                concurrency, client_processes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step", type=float, default=0.05, help="seconds between steps (default: 0.05)")
    ap.add_argument("--serve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.serve is not None:
        import uvicorn

        uvicorn.run(make_app(ns.step), host="127.0.0.1", port=ns.serve, log_level="warning", loop="auto",
                    http="auto")
        return 0
    load = measure(ns.concurrency, ns.output_len, ns.step)
    print(f"bare SSE server: {ns.concurrency} streams of {ns.output_len} tokens, {load.us_per_token:.0f} us CPU per "
          f"token, {load.tokens_per_s:.0f} tokens/s delivered (offered {ns.concurrency / ns.step:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
