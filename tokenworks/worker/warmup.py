"""Warm-up before a worker reports ready: run the shapes it will meet once, so no request pays for them.

On a GPU the first call of each kernel shape loads modules and picks
algorithms (measured earlier: seconds on the first requests of a fresh
worker). The warm-up runs prefills of growing length up to the step's token
budget, decode steps at growing batch sizes up to ``max_num_seqs``, greedy
and sampled, and one KV staging round trip; then it forgets the prefixes it
cached so the pool is as fresh as before.
"""

from __future__ import annotations

import time

from tokenworks.engine.engine import Engine
from tokenworks.sampling_params import SamplingParams
from tokenworks.transfer.staging import block_io


def _sizes(limit: int, start: int = 1) -> list[int]:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def _prompt(n: int, salt: int, vocab: int) -> list[int]:
    return [(salt * 7919 + i * 31) % (vocab - 1) + 1 for i in range(n)]


def _drain(engine: Engine) -> int:
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps


def warm_up(engine: Engine, kv_tensor, pool) -> tuple[int, float]:
    """Run the warm-up on ``engine`` (idle, nothing queued); returns (steps run, seconds)."""
    t0 = time.perf_counter()
    cfg = engine.scheduler.config
    vocab = engine.vocab_size or 32000
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=2, ignore_eos=True, seed=0)
    steps, salt = 0, 0
    longest = min(cfg.max_num_batched_tokens, cfg.max_model_len - 4)
    for n in _sizes(longest, 16):
        salt += 1
        engine.add_request(f"warmup-p{salt}", _prompt(n, salt, vocab), greedy)
        steps += _drain(engine)
    for batch in _sizes(cfg.max_num_seqs):
        for i in range(batch):
            salt += 1
            engine.add_request(f"warmup-d{salt}", _prompt(8, salt, vocab), sampled if i % 2 else greedy)
        steps += _drain(engine)
    io = block_io(kv_tensor)
    io.write(io.read([1]), [1])  # the staging kernels and pinned buffers of a KV pull
    pool.reset_prefix_cache()
    return steps, time.perf_counter() - t0
