"""Serving benchmark: KV transfer speed between processes, and TTFT aggregated vs disaggregated.

1. KV transfer. A source process holds a KV pool of the default model's
   shape; this process pulls a prompt's blocks from it over NIXL and TCP.
   Reported: bytes per token, time per request, GB/s, and the same bytes
   moved by a plain in-process memory copy (torch) measured in the same run.
2. TTFT at low load. The real server, one request at a time, on the same
   prompts: aggregated (one worker) vs disaggregated (one prefill + one
   decode worker; every prompt is longer than the local-prefill threshold).

    python benchmarks/serving.py [--skip-ttft] [--requests 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time

import torch

BLOCK = 16


def pool_shape(num_blocks: int):
    from tokenworks.model.weights import load_tokenizer_files

    c = load_tokenizer_files(None).config
    return (num_blocks, c.num_layers, 2, BLOCK, c.num_kv_heads, c.head_dim)


def _layout(shape):
    from tokenworks.transfer.base import KVLayout

    nbytes = 4
    for d in shape[1:]:
        nbytes *= d
    return KVLayout("bench", "float32", shape[1], shape[4], shape[5], BLOCK, nbytes)


def transfer_table(tokens_list: list[int], reps: int) -> list[tuple]:
    from tokenworks.planner.profiler import kv_source_process

    shape = pool_shape(1 + 2 * (max(tokens_list) // BLOCK + 1))
    layout = _layout(shape)
    dst = torch.zeros(shape)
    src_local = torch.randn(shape)
    rows = []
    ctx = mp.get_context("spawn")
    sinks = {}
    for kind in ("nixl", "tcp"):
        try:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=kv_source_process, args=(kind, layout, shape, "float32", child), daemon=True)
            proc.start()
            peer = parent.recv()
            if kind == "nixl":
                from tokenworks.transfer.nixl import NixlSink

                sink = NixlSink("bench-dst", layout, dst)
            else:
                from tokenworks.transfer.tcp import TCPSink

                sink = TCPSink(layout, dst)
            sinks[kind] = (sink, peer, parent, proc)
        except Exception as e:  # noqa: BLE001 - report and go on with the other transport
            print(f"{kind}: unavailable ({e})", file=sys.stderr)
    for n_tokens in tokens_list:
        n_blocks = -(-n_tokens // BLOCK)
        remote = list(range(1, 1 + n_blocks))
        local = list(range(1 + n_blocks, 1 + 2 * n_blocks))
        nbytes = n_blocks * layout.block_nbytes

        def memcpy():  # the same bytes, one contiguous copy inside one process
            dst[local[0] : local[-1] + 1].copy_(src_local[remote[0] : remote[-1] + 1])

        memcpy()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # memcpy(3) is one thread; so is one UCX copy
        t_copy = statistics.median(_timed(memcpy) for _ in range(reps))
        torch.set_num_threads(threads)
        t_copy_all = statistics.median(_timed(memcpy) for _ in range(reps))
        row = [n_tokens, nbytes, t_copy, t_copy_all]
        for kind in ("nixl", "tcp"):
            if kind not in sinks:
                row.append(None)
                continue
            sink, peer, _, _ = sinks[kind]
            sink.pull(peer, "warm", remote, local, timeout=30)  # connection set-up is not per request
            row.append(statistics.median(_timed(lambda: sink.pull(peer, "r", remote, local, timeout=30))
                                         for _ in range(reps)))
        rows.append(tuple(row))
    for kind, (sink, _, parent, proc) in sinks.items():
        sink.close()
        parent.send("stop")
        proc.join(timeout=5)
    return rows


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


SPLIT = ["--prefill-workers", "1", "--decode-workers", "1"]


def ttft(flags: list[str], prompts: list[str]) -> list[float]:
    import openai

    sys.path.insert(0, ".")
    from tests.serving import Server

    s = Server(*flags)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        c.completions.create(model="default", prompt="warm up", max_tokens=2)
        out = []
        for p in prompts:
            t = time.perf_counter()
            stream = c.completions.create(model="default", prompt=p, max_tokens=2, temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    out.append(time.perf_counter() - t)
                    break
            for _ in stream:
                pass
        kv = s.metric("tokenworks:kv_transfer_seconds_sum"), s.metric("tokenworks:kv_transfer_seconds_count")
        return out, kv
    finally:
        s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--requests", type=int, default=6, help="prompts per TTFT configuration")
    ap.add_argument("--prompt-words", type=int, default=700, help="words per TTFT prompt (about 1,000 tokens)")
    ap.add_argument("--skip-ttft", action="store_true")
    args = ap.parse_args()

    rows = transfer_table([128, 512, 1024, 2048, 4096], args.reps)
    shape = pool_shape(2)
    per_token = rows[0][1] // (-(-rows[0][0] // BLOCK)) // BLOCK
    print(f"\nKV bytes per token: {per_token} (float32, {shape[1]} layers x 2 x {shape[4]} heads x {shape[5]})")
    print("memcpy: one contiguous torch copy of the same bytes in this process, on 1 thread and on all "
          f"{torch.get_num_threads()}; 'vs copy' is against the 1-thread copy")
    print(f"{'tokens':>7}{'MB':>8}{'memcpy ms':>11}{'GB/s':>7}{'all thr GB/s':>13}{'nixl ms':>9}{'GB/s':>7}{'vs copy':>8}"
          f"{'tcp ms':>8}{'GB/s':>7}{'vs copy':>8}")
    for n, nbytes, t_copy, t_copy_all, t_nixl, t_tcp in rows:
        line = (f"{n:>7}{nbytes / 1e6:>8.1f}{t_copy * 1e3:>11.2f}{nbytes / t_copy / 1e9:>7.1f}"
                f"{nbytes / t_copy_all / 1e9:>13.1f}")
        for t in (t_nixl, t_tcp):
            line += f"{'-':>9}{'-':>7}{'-':>8}" if t is None else \
                f"{t * 1e3:>9.2f}{nbytes / t / 1e9:>7.1f}{t_copy / t:>8.0%}"
        print(line)

    if not args.skip_ttft:
        words = "harbour ship sail wind tide rope anchor deck mast crew".split()
        prompts = [" ".join(words[(i * 7 + j) % len(words)] + str(i) for j in range(args.prompt_words))
                   for i in range(args.requests)]
        configs = [
            ("aggregated, 1 worker on CPU 0", ["--aggregated-workers", "1", "--cpu-sets", "0"]),
            ("aggregated, 1 worker on CPUs 0,1", ["--aggregated-workers", "1"]),
            ("disaggregated nixl, prefill CPU 0 + decode CPU 1", [*SPLIT, "--kv-transport", "nixl"]),
            ("disaggregated tcp, prefill CPU 0 + decode CPU 1", [*SPLIT, "--kv-transport", "tcp"]),
        ]
        print(f"\nTTFT at low load, {args.requests} prompts of ~{args.prompt_words * 1.45:.0f} tokens, one at a time")
        results = {}
        for name, flags in configs:
            times, (kv_sum, kv_n) = ttft(flags, prompts)
            results[name] = statistics.median(times)
            kv = f", KV transfer {kv_sum / kv_n * 1e3:.0f} ms/request" if kv_n else ""
            print(f"  {name:<52} median {results[name] * 1e3:7.0f} ms{kv}", flush=True)
        base = results[configs[0][0]]
        for name, _ in configs[2:]:
            print(f"  {name:<52} {results[name] / base - 1:+.1%} vs aggregated on the same one CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
