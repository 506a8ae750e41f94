"""The host's share of a decode step: everything but the network, on the CUDA-graph path.

On a GPU a decode step of a small model takes 2-3 ms on the device (the floor measured on an H200: 2.1 ms at
batch 1, 2.8 at 128, SmolLM2-135M's shape); the host's work for a step (schedule, block tables, input staging,
sampling bookkeeping, update, outputs) must fit inside that for the overlapped engine to keep the GPU busy.
Here the graph path runs with its capture stubbed and the replay a no-op, on a tiny model, so a step's time is
the host's work alone. Prints the median ms per step at each batch size for the stepwise and the overlapped
loop, alternated over rounds in one process (the median of the rounds').

    python benchmarks/host_step.py [--batches 1,16,64] [--context 300] [--steps 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this tree's tokenworks
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import median_time  # noqa: E402

from tokenworks.config import EngineArgs, ModelConfig  # noqa: E402
from tokenworks.llm import build_random_engine  # noqa: E402
from tokenworks.model.cuda_graphs import EagerCapture  # noqa: E402
from tokenworks.sampling_params import SamplingParams  # noqa: E402

TINY = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position=8192, tie_word_embeddings=True)


def host_step_ms(batch: int, context: int, steps: int, overlap: bool) -> float:
    blocks = batch * -(-(2 * context + steps + 32) // 16) + 8
    args = EngineArgs(dtype="float32", num_blocks=blocks, max_num_seqs=batch, max_num_batched_tokens=8192,
                      max_model_len=2 * context + steps + 16, overlap_schedule="on" if overlap else "off")
    loaded = build_random_engine(args, TINY, "tiny")
    graphs = loaded.runner.capture_graphs(batch, -(-args.max_model_len // 16), EagerCapture())
    hidden = torch.zeros(batch, TINY.hidden_size)
    for size in graphs.replays:  # the device's part: nothing
        graphs.replays[size] = lambda: None
        graphs.outputs[size] = hidden[:size]
    engine = loaded.engine
    engine.cumulative_outputs = False  # as a serving worker runs it
    for i in range(batch):  # contexts spread over [context, 2 context)
        prompt = [(7 * i + 3 * j) % 96 + 1 for j in range(context + context * i // batch)]
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()
    return median_time(engine.step, steps, warmup=0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=300, help="shortest context; the batch spreads up to twice it")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="stepwise and overlapped runs, alternated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"host work of a decode step (graph path, device work stubbed), contexts {args.context}-"
          f"{2 * args.context}; median of {args.rounds} rounds [rounds]")
    for b in (int(x) for x in args.batches.split(",")):
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for overlap in (False, True):
                runs[overlap].append(host_step_ms(b, args.context, args.steps, overlap))
        line = []
        for overlap, name in ((False, "stepwise"), (True, "overlapped")):
            ms = statistics.median(runs[overlap])
            line.append(f"{name} {ms:.3f} ms ({ms / b * 1e3:.1f} µs/row) [" +
                        ", ".join(f"{x:.2f}" for x in runs[overlap]) + "]")
        print(f"batch {b:>4}: " + "; ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
