"""What `make serve` costs a laptop: time to ready from an empty cache and from a warm one, and resident memory.

Starts the real `tokenworks serve` (its default layout for this machine, the built-in model) with its cache
folder (XDG_CACHE_HOME) in a fresh temporary directory: the first start converts the GGUF and builds the
native kernels, the second finds them. Between the two it streams requests with the `openai` client, then
reads the resident memory (VmRSS) of the router and of each worker from /proc. Prints the figures against
the targets of the CPU-default issue (cold start <= 15 s, whole deployment <= 1 GB).

    python benchmarks/deployment.py [--requests 20] [--max-tokens 64] [-- extra serve flags]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.serving import Server  # noqa: E402  (the tests' helper: a real server on 127.0.0.1, stopped by pid)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start(flags: list[str]) -> tuple[Server, float]:
    t0 = time.perf_counter()
    server = Server(*flags, startup_timeout=300)
    return server, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20, help="chat requests streamed before memory is read")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("serve_flags", nargs="*", help="extra `tokenworks serve` flags (after --)")
    ns = ap.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache  # the server and its workers inherit it: an empty cache
        server, cold = start(ns.serve_flags)
        try:
            client = OpenAI(base_url=server.url + "/v1", api_key="none")
            for i in range(ns.requests):
                stream = client.chat.completions.create(
                    model="default", stream=True, max_tokens=ns.max_tokens, temperature=0,
                    messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}])
                for _ in stream:
                    pass
            router = rss_mb(server.proc.pid)
            workers = {wid: rss_mb(w["pid"]) for wid, w in server.workers().items()}
        finally:
            server.stop()
        server, warm = start(ns.serve_flags)
        server.stop()
    total = router + sum(workers.values())
    print(f"cold start (empty cache) to /health: {cold:5.1f} s   target <= 15 s: {'met' if cold <= 15 else 'missed'}")
    print(f"warm start to /health:               {warm:5.1f} s")
    print(f"resident memory after {ns.requests} streamed requests:")
    print(f"  router     {router:7.0f} MB")
    for wid, mb in workers.items():
        print(f"  {wid:<10} {mb:7.0f} MB")
    print(f"  total      {total:7.0f} MB   target <= 1024 MB: {'met' if total <= 1024 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
