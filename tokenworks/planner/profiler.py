"""``tokenworks profile``: measure one worker's engine on this hardware and fit its latency models.

Every step is timed around ``Engine.step()`` (scheduling, the forward pass,
sampling and detokenization: what a worker does per step) while a thin
wrapper around the runner records the step's shape, so each measured point
is (new tokens, sum of new tokens x context, seconds). Prefill points
cover single and batched prompts and the later chunks of prompts longer
than the step budget; decode points cover batch sizes and contexts. KV
transfer is timed between this process and a child process holding a KV
pool of the same layout, over the transport the server would use.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

from tokenworks.planner.profile import DECODE_FORM, PREFILL_FORM, Profile, fit_transfer, fit_with_holdout


@dataclass(frozen=True)
class Plan:
    """What to measure. ``prefill``: (prompts per step, prompt length); ``decode``: (batch, context)."""

    prefill: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int], ...]
    decode_steps: int
    reps: int
    transfer_tokens: tuple[int, ...]
    for_tests: bool = False  # the few points of ``Plan.quick()``: for tests, not for plans

    @classmethod
    def quick(cls) -> "Plan":
        return cls(prefill=((1, 16), (1, 64), (1, 200), (2, 100), (1, 700), (4, 32), (1, 300), (3, 60)),
                   decode=((1, 32), (4, 32), (8, 200), (1, 300), (16, 64), (2, 150), (12, 100), (6, 250)),
                   decode_steps=4, reps=1, transfer_tokens=(16, 256), for_tests=True)

    @classmethod
    def thorough(cls, max_batch: int = 64, decode_tokens: int = 16384, contexts: tuple[int, ...] = (32, 256, 1024)
                 ) -> "Plan":
        """``decode_tokens``: most batch x context in a decode point (each point prefills that much first)."""
        prefill = ((1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (1, 384), (1, 512), (2, 32), (4, 32), (8, 32),
                   (2, 128), (4, 100), (2, 256), (3, 150), (16, 16), (1, 1024), (1, 1536), (1, 2048), (6, 80),
                   (1, 96), (1, 768))
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch]
        decode = tuple((b, c) for c in contexts for b in batches if b * c <= decode_tokens)
        return cls(prefill=prefill, decode=decode + ((3, 500), (24, 128), (12, 640)), decode_steps=12, reps=3,
                   transfer_tokens=(16, 64, 256, 1024, 2048))


class _Recorder:
    """Wraps a runner; remembers the shape of the last step it executed."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.tokens = 0
        self.attention = 0
        self.batch = 0
        self.prefill = False

    def execute(self, sched):
        self.tokens = sched.num_scheduled_tokens
        self.attention = sum(s.num_tokens * s.context_len for s in sched.scheduled)
        self.batch = len(sched.scheduled)
        self.prefill = any(s.num_tokens > 1 for s in sched.scheduled)
        return self.runner.execute(sched)


class _Prompts:
    """Token ids that never hit the prefix cache (each prompt starts with its own token)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.k = 0

    def __call__(self, n: int) -> list[int]:
        self.k += 1
        lo = min(100, self.vocab // 4)
        span = self.vocab - lo
        return [lo + (self.k * 7919 + j * 104729) % span for j in range(n)]


def _time_step(engine, sync) -> float:
    t = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - t


def measure_prefill(engine, rec: _Recorder, prompts: _Prompts, n: int, length: int, reps: int, sync,
                    ) -> list[tuple[int, int, float]]:
    """Points (tokens, attention, seconds) of each step that prefills n prompts of ``length`` together."""
    from tokenworks.sampling_params import SamplingParams

    by_shape: dict[tuple[int, int], list[float]] = {}
    for r in range(reps + 1):  # the first round warms up and is not kept
        ids = [f"p{prompts.k}-{i}" for i in range(n)]
        for rid in ids:
            engine.add_request(rid, prompts(length), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            dt = _time_step(engine, sync)
            if r and rec.prefill:
                by_shape.setdefault((rec.tokens, rec.attention), []).append(dt)
    return [(t, a, statistics.median(v)) for (t, a), v in by_shape.items()]


def decode_point_tokens(sched, batch: int, context: int, steps: int) -> int:
    """Tokens each request of a decode point generates. The requests prefilled first decode while the others
    prefill, at most ``prefill_tokens_while_decoding`` prompt tokens a step beside them: enough that none ends
    before the timing does."""
    budget = sched.max_num_batched_tokens
    room = min(budget, sched.prefill_tokens_while_decoding or budget)
    return steps + 4 + batch * -(-context // room) + batch


def measure_decode(engine, rec: _Recorder, prompts: _Prompts, batch: int, context: int, steps: int, sync,
                   ) -> tuple[int, int, float]:
    """One point (batch, mean context sum, median seconds) of decode steps at this batch and context."""
    from tokenworks.sampling_params import SamplingParams

    ids = [f"d{prompts.k}-{i}" for i in range(batch)]
    max_tokens = decode_point_tokens(engine.scheduler.config, batch, context, steps)
    for rid in ids:
        engine.add_request(rid, prompts(context), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()
    _time_step(engine, sync)  # warm-up decode step
    times, ctx = [], []
    for _ in range(steps):
        times.append(_time_step(engine, sync))
        ctx.append(rec.attention)
        if rec.batch != batch or rec.prefill:
            raise RuntimeError(f"decode step ran {rec.batch} requests, expected {batch}: pool too small?")
    for rid in ids:
        engine.abort(rid)
    return batch, int(statistics.mean(ctx)), statistics.median(times)


# --- KV transfer -----------------------------------------------------------------------------------

def block_pattern(block_id: int, nbytes: int, device: str = "cpu"):
    """The bytes a patterned KV source puts in one block: different in every block and every byte."""
    import torch

    return ((torch.arange(nbytes, device=device, dtype=torch.int32) + 7 * block_id) % 251).to(torch.uint8)


def kv_source_process(kind: str, layout, shape, dtype: str, conn, device: str = "cpu", pattern: bool = False) -> None:
    """A child process holding a KV pool of ``shape`` on ``device`` behind a ``kind`` ("nixl" or "tcp") source:
    sends its card on ``conn`` (with the CUDA IPC handle when on a GPU), serves pulls until told to stop.
    ``pattern``: fill each block with ``block_pattern`` so that a reader can check what it got."""
    import msgspec
    import torch

    from tokenworks.transfer.base import host_id
    from tokenworks.transfer.staging import block_view

    tensor = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
    if pattern:
        blocks = block_view(tensor)
        for b in range(blocks.shape[0]):
            blocks[b] = block_pattern(b, blocks.shape[1], device)
    if kind == "nixl":
        from tokenworks.transfer.nixl import NixlSource as Source
    else:
        from tokenworks.transfer.tcp import TCPSource as Source
    src = Source("profile-src", layout, tensor)
    peer = src.peer()
    if tensor.is_cuda:
        from tokenworks.transfer.cuda_ipc import export

        peer = msgspec.structs.replace(peer, host=host_id(), cuda_ipc=export(tensor))
    conn.send(peer)
    conn.recv()  # until told to stop
    src.close()


def measure_transfer(kv, block_size: int, dtype: str, model: str, tokens: tuple[int, ...], reps: int,
                     transport: str) -> tuple[list[tuple[int, float]], str]:
    """(bytes, seconds) of pulling a prompt's blocks from another process; falls back to TCP without NIXL."""
    import torch

    from tokenworks.transfer.base import KVLayout

    blocks = 1 + 2 * (max(tokens) // block_size + 1)
    shape = (blocks, *kv.tensor.shape[1:])
    layout = KVLayout(model, dtype, shape[1], shape[4], shape[5], block_size, kv.block_nbytes)
    dst = torch.zeros(shape, dtype=kv.tensor.dtype)
    ctx = mp.get_context("spawn")
    for kind in ([transport, "tcp"] if transport != "tcp" else ["tcp"]):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=kv_source_process, args=(kind, layout, shape, dtype, child), daemon=True)
        proc.start()
        try:
            peer = parent.recv()
            if kind == "nixl":
                from tokenworks.transfer.nixl import NixlSink

                sink = NixlSink("profile-dst", layout, dst)
            else:
                from tokenworks.transfer.tcp import TCPSink

                sink = TCPSink(layout, dst)
        except Exception as e:  # noqa: BLE001 - NIXL missing or failing: measure TCP instead
            print(f"tokenworks profile: {kind} transfer unavailable ({e}); trying tcp", file=sys.stderr)
            parent.send("stop")
            proc.join(timeout=5)
            continue
        try:
            points = []
            for n in tokens:
                nb = -(-n // block_size)
                remote, local = list(range(1, 1 + nb)), list(range(1 + nb, 1 + 2 * nb))
                sink.pull(peer, "warm", remote, local, timeout=30)
                times = []
                for _ in range(max(3, reps)):
                    t = time.perf_counter()
                    sink.pull(peer, "r", remote, local, timeout=30)
                    times.append(time.perf_counter() - t)
                points.append((nb * kv.block_nbytes, statistics.median(times)))
            return points, kind
        finally:
            sink.close()
            parent.send("stop")
            proc.join(timeout=5)
    raise RuntimeError("no KV transport could be measured")


# --- the whole profile -------------------------------------------------------------------------------

def hardware_name(device: str) -> str:
    """This machine as a catalog name where it is one we know, else a plain description."""
    from tokenworks.planner.catalog import load_catalog

    names = list(load_catalog().kinds)
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(device)
        for name in names:
            if name.split("-")[0].lower() in gpu.lower():
                return name
        return gpu
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return "CPU-EPYC-1core" if "EPYC" in cpu and "CPU-EPYC-1core" in names else cpu


def profile_engine(args, plan: Plan, *, random_config=None, hardware: str | None = None, transport: str = "nixl",
                   progress: bool = True) -> Profile:
    """Build the engine ``args`` describes (or a random-weight one of ``random_config``'s shape) and measure it."""
    import torch
    from tqdm import tqdm

    from tokenworks.llm import build_engine, build_random_engine

    if random_config is not None:
        loaded = build_random_engine(args, random_config, f"random-{random_config.architecture}-"
                                     f"{random_config.num_layers}L-{random_config.hidden_size}")
    else:
        loaded = build_engine(args)
    engine = loaded.engine
    engine.overlap = False  # each step is timed alone, from its schedule to its tokens
    rec = _Recorder(engine.runner)
    engine.runner = rec
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prompts = _Prompts(loaded.model_config.vocab_size)
    kv = loaded.runner.kv
    capacity = (loaded.pool.num_blocks - 1) * args.block_size
    max_len = engine.max_model_len
    sched = engine.scheduler.config
    prefill_plan = [(n, length) for n, length in plan.prefill if n * length <= capacity // 2 and length < max_len]
    def room(b: int, c: int) -> int:  # context a decoding request may reach
        return c + decode_point_tokens(sched, b, c, plan.decode_steps)

    decode_plan = [(b, c) for b, c in plan.decode
                   if b * room(b, c) <= capacity * 0.8 and b <= sched.max_num_seqs and room(b, c) < max_len]
    bar = tqdm(total=len(prefill_plan) + len(decode_plan) + 1, desc="profile", unit="point", disable=not progress,
               file=sys.stderr)
    pre: list[tuple[int, int, float]] = []
    for n, length in prefill_plan:
        bar.set_postfix_str(f"prefill {n} x {length} tokens")
        pre.extend(measure_prefill(engine, rec, prompts, n, length, plan.reps, sync))
        bar.update(1)
    dec: list[tuple[int, int, float]] = []
    for b, c in decode_plan:
        bar.set_postfix_str(f"decode batch {b}, context {c}")
        dec.append(measure_decode(engine, rec, prompts, b, c, plan.decode_steps, sync))
        bar.update(1)
    bar.set_postfix_str("KV transfer")
    dtype = args.device_config().resolved_dtype
    xfer, kind = measure_transfer(kv, args.block_size, kv.dtype_name, loaded.model_name,
                                  plan.transfer_tokens, plan.reps, transport if not cuda else "tcp")
    bar.update(1)
    bar.close()
    pre.sort()
    dec.sort()
    prefill = fit_with_holdout([p[0] for p in pre], [p[1] for p in pre], [p[2] for p in pre], PREFILL_FORM)
    decode = fit_with_holdout([p[0] for p in dec], [p[1] for p in dec], [p[2] for p in dec], DECODE_FORM)
    transfer = fit_transfer([p[0] for p in xfer], [p[1] for p in xfer], kind)
    threads = torch.get_num_threads() if not cuda else None
    return Profile(
        model=loaded.model_name, dtype=dtype, device="cuda" if cuda else "cpu",
        hardware=hardware or hardware_name(args.device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        kv_bytes_per_token=kv.block_nbytes // args.block_size,  # an int8 pool's scales included
        # what a step reads (4-bit layers their packed bytes), which projection's weight term needs
        weight_bytes=loaded.runner.model.step_weight_bytes, parameters=loaded.runner.model.num_parameters,
        prefill=prefill, decode=decode, transfer=transfer,
        max_num_batched_tokens=sched.max_num_batched_tokens, max_num_seqs=sched.max_num_seqs,
        prefill_tokens_while_decoding=sched.prefill_tokens_while_decoding,
        prefix_caching=args.enable_prefix_caching, quick=plan.for_tests,
        block_size=args.block_size, kv_capacity_tokens=capacity,
        units=(len(os.sched_getaffinity(0)) if not cuda else 1), threads=threads,
        # model/runner.py attends decodes in groups of similar length: the step follows the sum of contexts
        # (benchmarks/mixed_decode.py); profiles measured before that say "padded".
        decode_attention="sum",
        points={"prefill": pre, "decode": dec, "transfer": xfer},
    )
