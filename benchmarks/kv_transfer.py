"""KV transfer between two processes against a copy of the same bytes inside one process, same run.

A child process holds a KV pool of a real model's shape (benchmarks/configs/) with a known byte pattern
in every block; this process pulls a prompt's blocks from it through each path its device allows, checks
every byte it got, and times the pull against the baseline copy of the same bytes on its own device:

- cuda: the same-host GPU path (CUDA IPC, device to device) and the network path (TCP, one staged copy
  each way); baseline: a device-to-device copy of the same bytes.
- cpu: the TCP path; baseline: a memory copy.

Block ids are contiguous (a fresh pool) or scattered (a pool after churn). Prints one row per case with
the median of ``--reps`` pulls and the ratio copy/pull (1.0 = as fast as a local copy; the GPU target
for the same-host path is 0.5 or more).

    python benchmarks/kv_transfer.py --device cuda --shapes smollm2-135m,llama-3.1-8b --tokens 1024,4096
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

BLOCK = 16


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_shape(shape_name: str, device: str, dtype: str, tokens: list[int], reps: int) -> list[dict]:
    from tokenworks.model.weights import read_hf_config
    from tokenworks.planner.profiler import block_pattern, kv_source_process
    from tokenworks.transfer.base import KVLayout
    from tokenworks.transfer.staging import block_view
    from tokenworks.transfer.tcp import TCPSink

    cfg = read_hf_config(os.path.join(os.path.dirname(__file__), "configs", f"{shape_name}.json"))
    most = -(-max(tokens) // BLOCK)
    num_blocks = 1 + 3 * most
    shape = (num_blocks, cfg.num_layers, 2, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    tdtype = getattr(torch, dtype)
    block_nbytes = cfg.num_layers * 2 * BLOCK * cfg.kv_size * torch.tensor([], dtype=tdtype).element_size()
    layout = KVLayout(shape_name, dtype, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, BLOCK, block_nbytes)
    dst = torch.zeros(shape, dtype=tdtype, device=device)
    dst_blocks = block_view(dst)
    local_src = block_view(torch.zeros(shape, dtype=tdtype, device=device))  # the baseline copy's source

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=kv_source_process, args=("tcp", layout, shape, dtype, child, device, True), daemon=True)
    proc.start()
    paths = {}
    try:
        peer = parent.recv()
        tcp = TCPSink(layout, dst)
        paths["tcp"] = (tcp, msgspec_replace(peer, cuda_ipc=None))
        if device.startswith("cuda"):
            from tokenworks.transfer.cuda_ipc import CudaIpcSink, OpenedPools

            paths["cuda_ipc"] = (CudaIpcSink(TCPSink(layout, dst), layout, dst, OpenedPools()), peer)
        rows, failures = [], []
        rng = random.Random(0)
        for n_tokens in tokens:
            nb = -(-n_tokens // BLOCK)
            cases = {
                "contiguous": (list(range(1, 1 + nb)), list(range(1 + nb, 1 + 2 * nb))),
                "scattered": (rng.sample(range(1, num_blocks), nb), rng.sample(range(1, num_blocks), nb)),
            }
            nbytes = nb * block_nbytes

            def copy():  # the same bytes, one contiguous copy on this process's device
                dst_blocks[1 + nb: 1 + 2 * nb].copy_(local_src[1: 1 + nb])

            t_copy = _median_seconds(copy, reps, device)
            for case, (remote, local) in cases.items():
                for path, (sink, card) in paths.items():
                    dst.zero_()
                    try:
                        sink.pull(card, "check", remote, local, timeout=60)
                        _sync(device)
                        for r, l in zip(remote, local):
                            if not torch.equal(dst_blocks[l], block_pattern(r, block_nbytes, device)):
                                raise AssertionError(f"block {r} -> {l} arrived wrong")
                        t = _median_seconds(lambda: sink.pull(card, "r", remote, local, timeout=60), reps, device)
                    except Exception as e:  # noqa: BLE001 - report it and measure the other paths
                        print(f"{shape_name} {n_tokens} tok {case} {path}: FAILED: {type(e).__name__}: {e}", flush=True)
                        failures.append(f"{shape_name}/{n_tokens}/{case}/{path}")
                        continue
                    rows.append(dict(shape=shape_name, dtype=dtype, device=device, tokens=n_tokens, ids=case,
                                     path=path, bytes=nbytes, pull_ms=t * 1e3, copy_ms=t_copy * 1e3,
                                     pull_gbps=nbytes / t / 1e9, copy_gbps=nbytes / t_copy / 1e9,
                                     ratio=t_copy / t))
                    print(_line(rows[-1]), flush=True)
        if failures:
            raise SystemExit(f"failed: {', '.join(failures)}")
        return rows
    finally:
        for sink, _ in paths.values():
            sink.close()
        parent.send("stop")
        proc.join(timeout=10)


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


def _line(r: dict) -> str:
    return (f"{r['shape']:>13} {r['tokens']:>5} tok {r['ids']:>10} {r['path']:>8}: {r['bytes'] / 2**20:8.1f} MiB "
            f"pull {r['pull_ms']:8.2f} ms ({r['pull_gbps']:7.1f} GB/s)   copy {r['copy_ms']:7.2f} ms "
            f"({r['copy_gbps']:7.1f} GB/s)   copy/pull {r['ratio']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--dtype", default=None, help="KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--shapes", default="smollm2-135m", help="comma-separated shapes from benchmarks/configs/")
    ap.add_argument("--tokens", default="1024,4096", help="prompt lengths to move (default: 1024,4096)")
    ap.add_argument("--reps", type=int, default=10, help="pulls per case; the median is reported (default: 10)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ns = ap.parse_args()
    dtype = ns.dtype or ("bfloat16" if ns.device.startswith("cuda") else "float32")
    tokens = [int(t) for t in ns.tokens.split(",")]
    rows = []
    for shape in ns.shapes.split(","):
        rows += run_shape(shape, ns.device, dtype, tokens, ns.reps)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
