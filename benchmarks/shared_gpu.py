"""What sharing one GPU with a second worker process costs a decode step, and how scattered KV blocks copy.

Disaggregation on one GPU puts a prefill and a decode worker process on the same device. This measures,
in one run, a random-weight engine's batch-1 decode step (median ms) in this process:

- alone;
- with a second process holding a CUDA context and an exported KV pool, idle;
- after this process opened that pool over CUDA IPC (what a decode worker does);
- while the second process runs decode steps of its own (both busy: the GPU time-slices the two).

Then the device-to-device copy of a prompt's KV blocks: contiguous ids (one copy), scattered ids (one
gather and one scatter), and scattered ids copied one block at a time, against one plain copy.

    python benchmarks/shared_gpu.py --shape smollm2-135m
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def _engine(shape: str):
    from tokenworks.config import EngineArgs
    from tokenworks.llm import build_random_engine
    from tokenworks.model.weights import read_hf_config

    cfg = read_hf_config(os.path.join(os.path.dirname(__file__), "configs", f"{shape}.json"))
    return build_random_engine(EngineArgs(device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0), cfg, shape)


def decode_ms(engine, steps: int = 60) -> float:
    from tokenworks.sampling_params import SamplingParams

    engine.add_request(f"r{time.time_ns()}", list(range(1, 65)), SamplingParams(temperature=0, max_tokens=steps + 1,
                                                                               ignore_eos=True))
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def other_process(shape: str, conn) -> None:
    from tokenworks.transfer.cuda_ipc import export

    loaded = _engine(shape)
    conn.send(export(loaded.runner.kv.tensor))
    while True:
        cmd = conn.recv()
        if cmd == "busy":
            while not conn.poll():
                decode_ms(loaded.engine, 20)
        elif cmd == "stop":
            return


def copy_figures(num_blocks: int, block_nbytes: int, n: int, reps: int = 20) -> None:
    from tokenworks.transfer.staging import block_view, copy_blocks

    src = block_view(torch.randint(0, 255, (num_blocks, block_nbytes), dtype=torch.uint8, device="cuda"))
    dst = torch.zeros_like(src)
    rng = random.Random(0)
    s_ids, d_ids = rng.sample(range(1, num_blocks), n), rng.sample(range(1, num_blocks), n)

    def timed(fn) -> float:
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    def per_block():
        for s, d in zip(s_ids, d_ids):
            dst[d].copy_(src[s], non_blocking=True)

    base = timed(lambda: dst[1:1 + n].copy_(src[1:1 + n]))
    rows = {
        "contiguous (copy_blocks)": timed(lambda: copy_blocks(src, dst, range(1, 1 + n), range(1 + n, 1 + 2 * n))),
        "scattered (copy_blocks: gather+scatter)": timed(lambda: copy_blocks(src, dst, s_ids, d_ids)),
        "scattered, one copy per block": timed(per_block),
    }
    mib = n * block_nbytes / 2**20
    print(f"copy of {n} blocks ({mib:.0f} MiB): one plain copy {base:.3f} ms")
    for name, ms in rows.items():
        print(f"  {name:<42} {ms:8.3f} ms   plain/this {base / ms:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ns = ap.parse_args()
    from tokenworks.transfer.cuda_ipc import open_blocks

    loaded = _engine(ns.shape)
    e = loaded.engine
    decode_ms(e, 20)  # first-time shapes
    print(f"batch-1 decode step, {ns.shape} bf16, median ms:")
    print(f"  alone                                   {decode_ms(e):7.2f}", flush=True)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=other_process, args=(ns.shape, child), daemon=True)
    proc.start()
    try:
        handle = parent.recv()
        print(f"  second process idle on the GPU          {decode_ms(e):7.2f}", flush=True)
        remote = open_blocks(handle)
        print(f"  + its pool opened here over CUDA IPC    {decode_ms(e):7.2f}  ({remote.shape[0]} blocks mapped)",
              flush=True)
        parent.send("busy")
        time.sleep(2)
        print(f"  second process decoding too            {decode_ms(e):7.2f}", flush=True)
        parent.send("stop")
        proc.join(timeout=30)
        print(f"  alone again                             {decode_ms(e):7.2f}", flush=True)
    finally:
        if proc.is_alive():
            proc.kill()
    copy_figures(1 + 3 * 256, 2 << 20, 256)  # Llama-3.1-8B, 4k tokens: 256 blocks of 2 MiB
    copy_figures(1 + 3 * 256, 360 << 10, 256)  # SmolLM2-135M, 4k tokens: 256 blocks of 360 KiB
    return 0


if __name__ == "__main__":
    sys.exit(main())
