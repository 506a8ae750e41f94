"""Prompt rows in the native CPU step against the layer-by-layer PyTorch path, same model, same run.

For each case (a fresh prompt of N tokens, or a chunk of N tokens after C cached ones) one step of the default model
runs both ways from the same KV, alternated over rounds: ``ModelRunner.forward_native`` (every layer in one native
call; the chunk's tokens attend by tiles of rows, kernels.c ``attend_tile``, or on AMX tiles from 256 tokens of
context where the CPU has AMX, ``amx_attention.c``) and ``prepare`` + ``LlamaModel.forward``
(layer by layer, PyTorch's attention over the chunk). Prints each side's median and native/layer-by-layer, and which
one ``ModelRunner.forward`` picks (``runner.native_suits``: the native step, but without AMX only for few prompt
rows).

    python benchmarks/native_prompt.py [--model PATH] [--cases 8,51,128,256,512,512@512,512@2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--cases", default="8,51,128,256,512,512@512,512@2048",
                    help="N (a fresh prompt) or N@C (N tokens after C cached), comma-separated")
    ap.add_argument("--rounds", type=int, default=5, help="steps each way, alternated (default: 5)")
    ns = ap.parse_args()
    import torch

    from tokenworks import LLM, SamplingParams
    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model.runner import native_suits

    runner = LLM(model=ns.model).loaded.runner
    if runner.native is None:
        print("no native step here (native kernels unavailable, or a layer not on them)")
        return 1
    kv, bs = runner.kv, runner.kv.block_size
    params = SamplingParams(temperature=0)
    gen = torch.Generator().manual_seed(0)

    def layer_by_layer(sched):
        _, ids, pos, meta, _ = runner.prepare(sched)
        return runner.model.forward(ids, pos, kv, meta)

    print(f"native step vs layer by layer, one step, {ns.rounds} rounds (medians); the native step takes "
          + (f"up to {runner.native_prompt_rows} prompt rows (no AMX)" if runner.native_prompt_rows else "every step"))
    print(f"{'case':>10} | {'mean context':>12} | {'layer by layer ms':>17} | {'native ms':>9} | {'native/lbl':>10} | picks")
    for case in ns.cases.split(","):
        n, _, cached = case.partition("@")
        n, cached = int(n), int(cached or 0)
        ids = torch.randint(100, 20000, (cached + n,), generator=gen).tolist()
        blocks = list(range(1, 1 + -(-(cached + n) // bs)))
        if cached:  # the cached tokens' K/V
            layer_by_layer([ScheduledRequest("c", ids[:cached], 0, blocks, False, params, ids[:cached], [])])
        sched = [ScheduledRequest("x", ids[cached:], cached, blocks, True, params, ids, [])]
        lbl, nat = [], []
        for _ in range(ns.rounds):
            t = time.perf_counter()
            layer_by_layer(sched)
            lbl.append(time.perf_counter() - t)
            t = time.perf_counter()
            runner.forward_native(sched)
            nat.append(time.perf_counter() - t)
        a, b = statistics.median(lbl), statistics.median(nat)
        picks = "native" if native_suits(sched, runner.native_prompt_rows) else "layer by layer"
        print(f"{case:>10} | {cached + (n + 1) / 2:12.0f} | {a * 1e3:17.1f} | {b * 1e3:9.1f} | {b / a:10.2f} | {picks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
