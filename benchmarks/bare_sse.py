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


def measure(concurrency: int, output_len: int, step: float, requests_per_stream: int = 1) -> float:
    """The bare server's CPU microseconds per delivered token under ``concurrency`` closed-loop streams."""
    from benchmarks.serving_path import cpu_seconds
    from tests.serving import free_port
    from tokenworks.bench.loadgen import Load, run_load
    from tokenworks.bench.workloads import BenchRequest

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step", str(step)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                import httpx

                httpx.post(f"http://127.0.0.1:{port}/", json={"max_tokens": 1}, timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare SSE server did not start")
                time.sleep(0.1)
        reqs = [BenchRequest("hello", output_len, input_tokens=0) for _ in range(concurrency * requests_per_stream)]
        cpu0 = cpu_seconds(proc.pid)
        results, _ = asyncio.run(run_load(f"http://127.0.0.1:{port}", reqs, Load(concurrency=concurrency),
                                          timeout=300))
        tokens = sum(r.output_tokens for r in results)
        return (cpu_seconds(proc.pid) - cpu0) / max(1, tokens) * 1e6
    finally:
        proc.terminate()
        proc.wait(10)


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
    us = measure(ns.concurrency, ns.output_len, ns.step)
    print(f"bare SSE server: {ns.concurrency} streams of {ns.output_len} tokens, {us:.0f} us CPU per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
