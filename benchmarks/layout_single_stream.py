"""One user's token gap on `make serve`'s two CPU layouts: one aggregated worker vs one prefill + one decode.

Starts the real server (the built-in model) with each layout in turn, streams five 64-token chat completions
with the `openai` client and prints the median gap between content chunks: the figure `serve` quotes when it
picks its default layout on a machine with fewer than 4 cores.

    python benchmarks/layout_single_stream.py
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.serving import Server  # noqa: E402  (the tests' helper: a real server on 127.0.0.1, stopped by pid)

LAYOUTS = {"aggregated": ["--aggregated-workers", "1"], "split": ["--prefill-workers", "1", "--decode-workers", "1"]}


def median_gap_ms(flags: list[str], streams: int = 5, max_tokens: int = 64) -> tuple[float, int]:
    from openai import OpenAI

    server = Server(*flags)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        gaps = []
        for i in range(streams):
            stream = client.chat.completions.create(
                model="default", stream=True, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": f"Write about rivers, part {i}."}])
            last = None
            for chunk in stream:
                now = time.perf_counter()
                if last is not None and chunk.choices and chunk.choices[0].delta.content:
                    gaps.append(now - last)
                last = now
        return statistics.median(gaps) * 1e3, len(gaps)
    finally:
        server.stop()


def main() -> int:
    gaps = {name: median_gap_ms(flags) for name, flags in LAYOUTS.items()}
    for name, (ms, n) in gaps.items():
        print(f"{name:<10} median token gap {ms:6.1f} ms over {n} gaps")
    print(f"split / aggregated: {gaps['split'][0] / gaps['aggregated'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
