"""``tokenworks simulate``: a discrete-event simulator of a whole deployment, one engine step at a time.

What it models, as the server does it:

- the router: admission (``max_inflight``), the decode worker with the fewest
  requests, conditional disaggregation (a prompt of at most
  ``local_prefill_threshold`` tokens, or every prompt when there is no
  prefill pool, is prefilled on the decode worker), the prefill worker with
  the fewest requests;
- prefix caching, where the workload says which prompts share a prefix
  (``SimWorkload.prefix_blocks``, from a Mooncake trace's ``hash_ids`` or a
  shared-prefix or multi-turn workload): each worker that prefills keeps the
  blocks of the prompts it prefilled (each chunk's as it is computed) or
  received, least recently used evicted first, in the room its KV pool has
  (below); a prompt's leading blocks found there when it starts are not prefilled again
  (their attention still counts), and a decode worker pulls only the blocks
  it lacks. The router then places as ``--routing kv`` does (router/policy.py):
  the decode worker, then the prefill worker, where (prompt tokens queued
  there + this prompt's tokens not cached there) / its prefill rate is
  least, equal costs to fewer requests in flight; local prefill when what
  the decode worker lacks is at most the threshold;
- prefill workers: FCFS, chunked prefill within ``max_num_batched_tokens``,
  the first token at the end of the step that finishes the prompt;
- KV transfer from prefill to decode worker over the decode worker's inbound
  link (``fixed_s + bytes / bytes_per_s``, transfers into one worker queue);
- decode and aggregated workers: continuous batching up to ``max_num_seqs``
  and the KV capacity (a request reserves its prompt + output of KV when it
  joins, or when its prompt starts there: a prompt waits, first come first
  served, until that fits beside the running requests), requests join at
  step boundaries; a step that also prefills (local prefill) is timed with
  the prefill fit over all its tokens, and takes at most the profile's
  ``prefill_tokens_while_decoding`` prompt tokens while the worker has
  requests decoding. With the prefix cache modelled, a decode worker's pool
  is counted in blocks as the engine's is: the stated blocks running
  requests read, once however many read them, and the rest of theirs; the
  cached blocks no request reads fill what is left, least recently used
  evicted first (``_PrefixCache``); with a host-memory tier
  (``Pool.host_kv_tokens``) an evicted block is kept there and a prompt that
  continues into it counts it cached (the copy back is not timed).

Step times come from each pool's ``Profile``. Between two changes of a
decode batch the step times form an arithmetic series (each step adds one
token of context per request), so the simulator jumps from one change to
the next in closed form instead of stepping: events are per request, not
per token, which is what lets it run an hour of a thousand-worker fleet.

A prefill worker's pool is counted the same way: a prompt holds its blocks
from its first chunk until its KV has crossed to its decode worker, and
waits to start until they fit.

Not modelled: prefix sharing the workload does not state (synthetic and
ShareGPT prompts are taken as uncached; their workers' pools are counted in
tokens, and a prefill worker's not at all), the time of host-tier copies, preemption (the engine takes KV a
chunk and a token at a time and preempts when short; the simulator
reserves it whole up front), worker failures, the router's predicted-wait
admission, sampling stop strings.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace

import numpy as np

from tokenworks.planner.profile import Profile


def _blocks_in(profile: Profile, gib: float) -> int:
    """Whole KV blocks of this profile's layout in ``gib`` of memory, as a worker counts them."""
    return int(gib * 2**30) // (profile.kv_bytes_per_token * profile.block_size)


def with_kv_pool(profile: Profile, gib: float | None) -> Profile:
    """The profile with a KV pool of ``gib`` per worker (None: as measured or projected), in whole blocks less the
    one the engine keeps back, as the worker sizes it (model/kv_cache.py, planner/profiler.py)."""
    if gib is None:
        return profile
    blocks = _blocks_in(profile, gib)
    if blocks < 2:
        raise ValueError(f"--kv-cache-memory-gib {gib:g} holds fewer than 2 blocks of this model")
    return replace(profile, kv_capacity_tokens=(blocks - 1) * profile.block_size)


def host_tier_tokens(profile: Profile, gib: float) -> int:
    """Tokens a host-memory KV tier of ``gib`` holds behind a worker of this profile: whole blocks of its pool's
    layout, as the worker sizes it (model/host_kv_tier.py)."""
    if gib < 0:
        raise ValueError("--kv-host-memory-gib must be >= 0")
    return _blocks_in(profile, gib) * profile.block_size


@dataclass(frozen=True)
class Pool:
    role: str  # "prefill", "decode" or "both"
    count: int
    profile: Profile
    price_per_hour: float | None = None  # per worker; None: unknown
    host_kv_tokens: int = 0  # per worker: a host-memory tier behind its pool (serve --kv-host-memory-gib), in tokens

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "both"):
            raise ValueError(f"pool role must be prefill, decode or both, not {self.role!r}")
        if self.count < 0:
            raise ValueError("a pool's worker count must be >= 0")


@dataclass(frozen=True)
class Deployment:
    pools: tuple[Pool, ...]
    local_prefill_threshold: int = 16
    max_inflight: int = 0  # 0: no limit
    overhead_s: float = 0.0  # added to every token's delivery (router, HTTP): measured, or 0
    step_overhead_s: float = 0.0  # added to every step: the serving loop's cost beyond Engine.step (measured, or 0)
    token_overhead_s: float = 0.0  # added to a decode step per request in it: per-token messages and streaming

    def __post_init__(self) -> None:
        if not any(p.count for p in self.pools if p.role in ("decode", "both")):
            raise ValueError("a deployment needs at least one decode or aggregated worker")

    @property
    def num_workers(self) -> int:
        return sum(p.count for p in self.pools)

    @property
    def units(self) -> int:
        """Accelerators (or CPU cores) in all."""
        return sum(p.count * p.profile.units for p in self.pools)

    @property
    def price_per_hour(self) -> float | None:
        if any(p.price_per_hour is None for p in self.pools if p.count):
            return None
        return sum(p.count * p.price_per_hour for p in self.pools if p.count)

    def describe(self) -> str:
        return " + ".join(f"{p.count} {p.role} on {p.profile.units} x {p.profile.hardware}"
                          + (f" (host KV tier {p.host_kv_tokens:,} tokens)" if p.host_kv_tokens else "")
                          for p in self.pools if p.count)


@dataclass
class SimWorkload:
    """Arrival times (s), prompt and output lengths (tokens), one entry per request.

    ``prefix_blocks``, where prompts share prefixes: per request the ids of its prompt's whole blocks of
    ``block_tokens`` tokens, in order; two prompts share their first k blocks when their first k ids are equal
    (Mooncake's ``hash_ids``). None: no prompt shares anything (no prefix caching)."""

    arrival: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    prefix_blocks: list | None = None
    block_tokens: int = 0

    def __post_init__(self) -> None:
        self.arrival = np.asarray(self.arrival, dtype=float)
        self.prompt_len = np.maximum(1, np.asarray(self.prompt_len, dtype=np.int64))
        self.output_len = np.maximum(1, np.asarray(self.output_len, dtype=np.int64))
        if not (len(self.arrival) == len(self.prompt_len) == len(self.output_len)):
            raise ValueError("arrival, prompt_len and output_len must have one entry per request")
        if self.prefix_blocks is not None:
            if len(self.prefix_blocks) != len(self.arrival):
                raise ValueError("prefix_blocks must have one entry per request")
            if self.block_tokens < 1:
                raise ValueError("prefix_blocks needs block_tokens >= 1")
            self.prefix_blocks = [tuple(b) for b in self.prefix_blocks]
        if len(self.arrival) and np.any(np.diff(self.arrival) < 0):
            order = np.argsort(self.arrival, kind="stable")
            self.arrival, self.prompt_len, self.output_len = (self.arrival[order], self.prompt_len[order],
                                                              self.output_len[order])
            if self.prefix_blocks is not None:
                self.prefix_blocks = [self.prefix_blocks[i] for i in order]

    def subset(self, idx: np.ndarray) -> "SimWorkload":
        """The requests at ``idx`` (in order)."""
        blocks = None if self.prefix_blocks is None else [self.prefix_blocks[i] for i in idx]
        return SimWorkload(self.arrival[idx], self.prompt_len[idx], self.output_len[idx], blocks, self.block_tokens)

    def chains(self) -> list[tuple[int, ...]]:
        """Per request, one key per whole block of its prompt that names the prefix through that block (so an id
        met after other ids is another block), at most prompt length // block_tokens of them."""
        out = []
        for ids, n in zip(self.prefix_blocks or [], self.prompt_len.tolist()):
            h, keys = 0, []
            for b in ids[: n // self.block_tokens]:
                h = hash((h, b))
                keys.append(h)
            out.append(tuple(keys))
        return out

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass
class SimResult:
    """Per request: first token and last token times (s from its arrival), NaN when rejected."""

    ttft: np.ndarray
    e2e: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    arrival: np.ndarray
    rejected: np.ndarray  # bool
    duration: float  # from the first arrival to the last token
    events: int
    wall_s: float
    stats: dict = field(default_factory=dict)

    @property
    def tpot(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.output_len > 1, (self.e2e - self.ttft) / (self.output_len - 1), np.nan)


class _LeastLoaded:
    """The index with the smallest load (ties: the smaller index), for loads that move by one.

    A heap of (load, index) entries kept lazily: an increase pushes nothing (the old entry is a
    lower bound, corrected when it reaches the top), a decrease pushes the exact value. So every
    index always has an entry no higher than its load, and an exact entry on top is the minimum.
    """

    def __init__(self, n: int) -> None:
        self.load = [0] * n
        self.heap = [(0, i) for i in range(n)]

    def pick(self) -> int:
        heap, load = self.heap, self.load
        while True:
            l, i = heap[0]
            actual = load[i]
            if actual == l:
                return i
            if l < actual:
                heapq.heapreplace(heap, (actual, i))
            else:
                heapq.heappop(heap)  # a lower exact entry for i was pushed since

    def add(self, i: int) -> None:
        self.load[i] += 1

    def remove(self, i: int) -> None:
        self.load[i] -= 1
        heapq.heappush(self.heap, (self.load[i], i))
        if len(self.heap) > 8 * len(self.load) + 64:
            self.heap = [(l, k) for k, l in enumerate(self.load)]
            heapq.heapify(self.heap)


class _PrefixCache:
    """One worker's KV pool as its prefix cache sees it (engine/block_pool.py): blocks running requests hold,
    their stated prompt blocks (``pinned``, chain key -> readers, each counted once) and the rest of theirs
    (``private``, a count); and the cached blocks no request holds (``blocks``), the least recently used evicted
    first when the pool needs room. ``known``: the computed blocks, held or not, which a lookup finds (a held
    block whose prompt is still being prefilled is not among them). With a host-memory tier
    (model/host_kv_tier.py), a block evicted from the pool is saved there (``host``, least recently used
    dropped first) and a lookup that continues into it copies it back: it counts as cached. ``holders``, shared
    by the workers of one role: first-block key -> the indices of the workers that hold it, in either tier
    (``_CacheRouting``)."""

    __slots__ = ("blocks", "known", "pinned", "private", "base", "host", "host_cap", "holders", "me")

    def __init__(self, capacity_blocks: int, holders: dict, me: int, host_blocks: int = 0) -> None:
        self.blocks: OrderedDict = OrderedDict()
        self.known: set = set()
        self.pinned: dict = {}
        self.private = 0
        self.base = max(0, capacity_blocks)
        self.host: OrderedDict = OrderedDict()
        self.host_cap = max(0, host_blocks)
        self.holders = holders
        self.me = me

    def free(self) -> int:
        """Blocks no running request holds (cached or not)."""
        return self.base - self.private - len(self.pinned)

    def in_use(self) -> bool:
        return bool(self.private or self.pinned)

    def need(self, keys: tuple, private: int) -> int:
        """Blocks a request of these stated blocks and ``private`` others takes from the free ones."""
        pinned = self.pinned
        return private + len(keys) - sum(1 for k in keys if k in pinned) if pinned else private + len(keys)

    def fits(self, keys: tuple, private: int) -> bool:
        """Whether a request of these stated blocks and ``private`` others fits in the blocks no request holds."""
        free = self.free()
        return len(keys) + private <= free or self.need(keys, private) <= free

    def admit(self, keys: tuple, private: int) -> bool:
        """Take them (``take``) when they fit, or when no request holds any block (a request larger than the pool
        still runs alone); False: it waits."""
        if not self.fits(keys, private) and self.in_use():
            return False
        self.take(keys, private)
        return True

    def held(self, keys: tuple) -> int:
        """How many of the leading blocks are here (in the pool, or the host tier)."""
        known, host, n = self.known, self.host, 0
        for k in keys:
            if k not in known and k not in host:
                break
            n += 1
        return n

    def restore(self, keys: tuple) -> None:
        """A prompt found these leading blocks: those in the host tier only are copied back into the pool."""
        known, host = self.known, self.host
        if not host:
            return
        back = [k for k in keys if k not in known]
        for k in back:
            host.move_to_end(k)
        self.store(tuple(back))

    def take(self, keys: tuple, private: int) -> None:
        """A request starts holding its stated blocks (cached ones leave the evictable list) and ``private``
        more; cached blocks are evicted for the room."""
        blocks, pinned = self.blocks, self.pinned
        for k in keys:
            c = pinned.get(k)
            if c:
                pinned[k] = c + 1
            else:
                pinned[k] = 1
                if k in blocks:
                    del blocks[k]
        self.private += private
        self._evict()

    def give(self, keys: tuple, private: int) -> None:
        """A request finished: blocks no other request reads become evictable, its tail first, as the engine
        frees them (kv_cache_manager.free), so its head, which other prompts share, leaves last. (Every prompt
        is stored, computed, before its request finishes.)"""
        blocks, pinned = self.blocks, self.pinned
        for k in reversed(keys):
            c = pinned.pop(k)
            if c == 1:
                blocks[k] = None
            else:
                pinned[k] = c - 1
        self.private -= private
        self._evict()

    def store(self, keys: tuple, start: int = 0) -> None:
        """A prompt's blocks from ``start`` on (those a prefill chunk just computed; 0: all of them when it is
        done) published in the cache, tail first (as ``give``); blocks a running request holds stay held."""
        blocks, pinned, known = self.blocks, self.pinned, self.known
        known.update(keys[start:])
        for k in [k for k in reversed(keys[start:]) if k not in pinned]:
            if k in blocks:
                blocks.move_to_end(k)
            else:
                blocks[k] = None
        if keys and keys[0] in known:
            self.holders.setdefault(keys[0], set()).add(self.me)
        self._evict()

    def _evict(self) -> None:
        blocks, known, host = self.blocks, self.known, self.host
        room = max(0, self.free())
        while len(blocks) > room:
            k = blocks.popitem(last=False)[0]
            known.discard(k)
            if self.host_cap:  # saved to the host tier, its least recently used dropped
                if k in host:
                    host.move_to_end(k)
                else:
                    host[k] = None
                    if len(host) > self.host_cap:
                        old = host.popitem(last=False)[0]
                        if old not in known:
                            self._forget(old)
            else:
                self._forget(k)

    def _forget(self, k) -> None:
        held_by = self.holders.get(k)
        if held_by is not None:
            held_by.discard(self.me)
            if not held_by:
                del self.holders[k]


class _CacheRouting:
    """``--routing kv`` over one role's workers without weighing each of them: the worker where (queued +
    uncached prompt tokens) / prefill rate is least, ties to fewer requests in flight, then the lower index.

    Only a worker that holds a prompt's first block can hold any of it (``holders``); every other costs
    (queued + prompt) / rate, least for the least-queued of its rate. So the candidates are the holders and, per
    distinct rate, the worker least in (queued, in flight, index), kept in a lazy heap as ``_LeastLoaded`` keeps
    its loads: a rise pushes nothing, a fall (``lowered``) pushes the exact key."""

    def __init__(self, workers: list, loads: _LeastLoaded, bt: int) -> None:
        self.workers = workers
        self.load = loads.load
        self.bt = bt
        self.holders: dict = {}
        rates = sorted({w.rate for w in workers})
        self.group = [rates.index(w.rate) for w in workers]
        self.heaps: list[list] = [[] for _ in rates]
        for i, w in enumerate(workers):
            self.heaps[self.group[i]].append((w.queued, self.load[i], i))
            caching = w.profile.prefix_caching
            w.cache = _PrefixCache(w.profile.kv_capacity_tokens // bt if caching else 0, self.holders, i,
                                   w.host_tokens // bt if caching else 0)
        for h in self.heaps:
            heapq.heapify(h)

    def lowered(self, i: int) -> None:
        """Worker i's queued tokens or requests in flight went down."""
        heap = self.heaps[self.group[i]]
        heapq.heappush(heap, (self.workers[i].queued, self.load[i], i))
        if len(heap) > 8 * len(self.workers) + 64:
            members = [k for k in range(len(self.workers)) if self.group[k] == self.group[i]]
            heap[:] = [(self.workers[k].queued, self.load[k], k) for k in members]
            heapq.heapify(heap)

    def _least(self, heap: list) -> int:
        workers, load = self.workers, self.load
        while True:
            q, l, i = heap[0]
            actual = (workers[i].queued, load[i], i)
            if actual == (q, l, i):
                return i
            if (q, l) < actual[:2]:
                heapq.heapreplace(heap, actual)
            else:
                heapq.heappop(heap)  # a lower exact entry for i was pushed since

    def pick(self, ks: tuple, length: int) -> tuple[int, int]:
        """(worker, tokens of the prompt it holds)."""
        workers, load, bt = self.workers, self.load, self.bt
        candidates = {self._least(h) for h in self.heaps}
        if ks:
            candidates.update(self.holders.get(ks[0], ()))
        best, pick, hit_of = None, 0, 0
        for i in candidates:
            w = workers[i]
            hit = min(w.cache.held(ks), (length - 1) // bt) * bt if ks else 0  # whole blocks, the last token's not
            key = ((w.queued + length - hit) / w.rate, load[i], i)
            if best is None or key < best:
                best, pick, hit_of = key, i, hit
        return pick, hit_of


def _steps_until(alpha: float, beta: float, dt: float) -> int:
    """Fewest whole steps (>= 1) whose total time reaches dt when step j takes alpha + beta*j."""
    if dt <= 0:
        return 1
    if beta <= 0:
        return max(1, math.ceil(dt / alpha)) if alpha > 0 else 1
    q = alpha + beta / 2
    return max(1, math.ceil((-q + math.sqrt(q * q + 2 * beta * dt)) / beta - 1e-9))


def _span(alpha: float, beta: float, k: int) -> float:
    """Seconds of k steps when step j takes alpha + beta*j."""
    return k * alpha + beta * k * (k + 1) / 2


def _plus(values: list[float], extra: float) -> list[float]:
    return [v + extra for v in values] if extra else values


class _Prefiller:
    __slots__ = ("profile", "queue", "busy", "step", "pg", "pc", "budget", "max_seqs", "queued", "rate", "cache",
                 "host_tokens")

    def __init__(self, profile: Profile, step_overhead: float = 0.0) -> None:
        self.profile = profile
        self.pg = _plus(profile.prefill.base_list(profile.max_num_batched_tokens), step_overhead)  # by tokens, less attention
        self.pc = profile.prefill.c
        self.budget = profile.max_num_batched_tokens
        self.max_seqs = profile.max_num_seqs
        self.queue: deque = deque()  # [request, tokens done]
        self.busy = False
        self.step: list = []  # (entry, chunk) of the step in flight
        self.queued = 0  # prompt tokens queued here, not yet prefilled (prefix routing's cost)
        self.rate = _prefill_rate(profile, self.pg)
        self.cache: _PrefixCache | None = None
        self.host_tokens = 0


class _Decoder:
    __slots__ = ("profile", "S", "t", "B", "K", "finish", "pending", "local", "kv_free", "version", "plan_k",
                 "event_t", "step", "link_free", "g", "c", "pg", "pc", "kv_per_token", "inv_bw", "fixed_s", "padded", "offs",
                 "queued", "rate", "cache", "host_tokens")

    def __init__(self, profile: Profile, step_overhead: float = 0.0, token_overhead: float = 0.0) -> None:
        self.profile = profile
        self.S = 0  # steps done
        self.t = 0.0  # time of the end of step S (or of the last event when idle)
        self.B = 0  # requests decoding
        self.K = 0  # sum over the batch of (prompt - join step): context sum at step s is K + B*s
        self.finish: list = []  # heap (step at whose end it finishes, request, K part)
        self.pending: list = []  # heap (time its KV is here, request): waits to join at a step boundary
        self.local: deque = deque()  # [request, tokens done]: prefills on this worker
        self.kv_free = profile.kv_capacity_tokens
        self.version = 0
        self.plan_k = 0  # steps the scheduled event completes (0: a wake-up)
        self.event_t = math.inf  # when the scheduled event fires (inf: none)
        self.step: list = []  # local prefill chunks of a mixed step in flight
        self.link_free = 0.0  # inbound KV link
        self.g = [v + step_overhead + token_overhead * b  # decode step seconds by batch, less attention
                  for b, v in enumerate(profile.decode.base_list(profile.max_num_seqs))]
        self.c = profile.decode.c
        self.pg = _plus(profile.prefill.base_list(profile.max_num_batched_tokens), step_overhead)
        self.pc = profile.prefill.c
        self.padded = profile.decode_attention == "padded"
        self.offs: list = []  # padded: heap (-(prompt - join step), request) -> the longest context in the batch
        self.kv_per_token = profile.kv_bytes_per_token
        self.inv_bw = 1.0 / profile.transfer.bytes_per_s
        self.fixed_s = profile.transfer.fixed_s
        self.queued = 0  # prompt tokens queued here for local prefill
        self.rate = _prefill_rate(profile, self.pg)
        self.cache: _PrefixCache | None = None
        self.host_tokens = 0


def _prefill_rate(profile: Profile, pg: list[float]) -> float:
    """Prompt tokens a second in full chunks, less attention: the router's measured rate under backlog."""
    n = profile.max_num_batched_tokens
    return n / pg[n] if pg[n] > 0 else math.inf


def simulate(dep: Deployment, work: SimWorkload, max_jump: int | None = None, shards: int = 1) -> SimResult:
    """Run the workload through the deployment; return per-request latencies.

    ``max_jump``: most decode steps crossed in one event (tests set 1 to check the closed form
    against steps). ``shards`` > 1: split every pool and the traffic (a seeded random split, so each
    shard's arrivals stay Poisson when the whole is) into that many independent parts simulated in
    parallel processes; the router then balances within a shard. For fleets far larger than the
    shard count this changes little and divides the wall time.
    """
    if shards > 1 and all(p.count >= shards for p in dep.pools if p.count) and len(work) >= 2 * shards:
        return _simulate_sharded(dep, work, max_jump, shards)
    return _simulate(dep, work, max_jump)


def _shard_deployment(dep: Deployment, k: int, shards: int) -> Deployment:
    pools = tuple(replace(p, count=p.count // shards + (1 if k < p.count % shards else 0)) for p in dep.pools)
    return replace(dep, pools=pools)


def _run_shard(args: tuple) -> SimResult:
    dep, work, max_jump = args
    return _simulate(dep, work, max_jump)


def _simulate_sharded(dep: Deployment, work: SimWorkload, max_jump: int | None, shards: int) -> SimResult:
    import multiprocessing as mp

    wall0 = time.perf_counter()
    which = np.random.default_rng(12345).integers(0, shards, len(work))
    if work.prefix_blocks is not None:  # prompts that start alike stay in one shard, where routing can meet them
        for i, ids in enumerate(work.prefix_blocks):
            if ids:
                which[i] = hash(ids[0]) % shards
    parts = [np.flatnonzero(which == k) for k in range(shards)]
    jobs = [(_shard_deployment(dep, k, shards), work.subset(idx), max_jump) for k, idx in enumerate(parts)]
    with mp.get_context("fork").Pool(shards) as pool:
        results = pool.map(_run_shard, jobs)
    ttft = np.full(len(work), np.nan)
    e2e = np.full(len(work), np.nan)
    rejected = np.zeros(len(work), dtype=bool)
    stats: dict = {}
    for idx, r in zip(parts, results):
        ttft[idx], e2e[idx], rejected[idx] = r.ttft, r.e2e, r.rejected
        for key, v in r.stats.items():
            stats[key] = stats.get(key, 0) + v
    stats["shards"] = shards
    done_at = e2e + work.arrival
    duration = float(np.nanmax(done_at) - work.arrival[0]) if not np.all(np.isnan(done_at)) else 0.0
    return SimResult(ttft=ttft, e2e=e2e, prompt_len=work.prompt_len, output_len=work.output_len, arrival=work.arrival,
                     rejected=rejected, duration=duration, events=sum(r.events for r in results),
                     wall_s=time.perf_counter() - wall0, stats=stats)


def _simulate(dep: Deployment, work: SimWorkload, max_jump: int | None) -> SimResult:
    wall0 = time.perf_counter()
    n = len(work)
    arrival = work.arrival.tolist()
    plen = work.prompt_len.tolist()
    olen = work.output_len.tolist()
    first = [math.nan] * n
    last = [math.nan] * n
    rejected = [False] * n
    home = [0] * n  # decode worker of each request
    reserved = [False] * n  # its KV taken from its decode worker's pool (when its prompt started there, or joined)

    prefillers: list[_Prefiller] = []
    decoders: list[_Decoder] = []
    for pool in dep.pools:
        for _ in range(pool.count):
            w = (_Prefiller(pool.profile, dep.step_overhead_s) if pool.role == "prefill"
                 else _Decoder(pool.profile, dep.step_overhead_s, dep.token_overhead_s))
            w.host_tokens = pool.host_kv_tokens
            (prefillers if pool.role == "prefill" else decoders).append(w)
    p_load = _LeastLoaded(len(prefillers))
    d_load = _LeastLoaded(len(decoders))
    keys = work.chains() if work.prefix_blocks is not None else None
    p_route = d_route = None  # prefix routing, where the workload states its blocks
    bt = work.block_tokens
    if keys is not None:
        p_route = _CacheRouting(prefillers, p_load, work.block_tokens)
        d_route = _CacheRouting(decoders, d_load, work.block_tokens)
    dhit = [0] * n  # prompt tokens the decode worker held when the request arrived (not pulled)
    cached_tokens = 0
    threshold = dep.local_prefill_threshold
    max_inflight = dep.max_inflight or n + 1
    overhead = dep.overhead_s
    jump = max_jump or 1 << 62
    inflight = 0
    events = 0
    heap: list = []  # (time, seq, kind, worker, version)
    seq = 0
    PREFILL, DECODE = 0, 1
    push, pop = heapq.heappush, heapq.heappop

    def d_remove(i: int) -> None:
        d_load.remove(i)
        if d_route is not None:
            d_route.lowered(i)
    kv_bytes = 0.0
    local_prefills = remote_prefills = num_rejected = 0

    def ctx0(d: _Decoder) -> int:
        """The decode attention feature at step d.S: the context sum, or batch x longest context when the
        profile's engine pads; either grows by B a step while the batch stays."""
        if not d.padded:
            return d.K + d.B * d.S
        if not d.B:
            return 0
        offs = d.offs
        while last[offs[0][1]] == last[offs[0][1]]:  # finished (not NaN): drop
            pop(offs)
        return d.B * (d.S - offs[0][0])

    def series(d: _Decoder) -> tuple[float, float]:
        """(alpha, beta): while the batch stays, step j after d.S takes alpha + beta*j seconds."""
        return d.g[d.B] + d.c * ctx0(d), d.c * d.B

    def schedule(d: _Decoder, idx: int, when: float, k: int) -> None:
        nonlocal seq
        d.version += 1
        d.plan_k = k
        d.event_t = when
        seq += 1
        push(heap, (when, seq, DECODE, idx, d.version))

    def look_up(entry: list, routing: _CacheRouting, idx: int) -> None:
        """A queued prompt starts on worker idx: what its cache holds of the prompt now, as the engine looks when
        it admits a request (blocks computed since it arrived, by a prompt that shares them, count)."""
        nonlocal cached_tokens
        r, w = entry[0], routing.workers[idx]
        hit = min(w.cache.held(keys[r]), (plen[r] - 1) // bt) * bt  # as kv_cache_manager: whole blocks before the last token
        w.cache.restore(keys[r][: hit // bt])
        if hit > entry[1]:
            gain = hit - entry[1]
            entry[1] = hit
            w.queued -= gain
            cached_tokens += gain
            routing.lowered(idx)

    def begin(entry: list, routing: _CacheRouting | None, idx: int, kv: _Decoder | None, pk: int | None) -> bool:
        """A queued prompt's first chunk: on a decode worker (``kv``) or a prefill worker whose pool is counted
        in blocks (``pk``) only when its KV fits (``admit``, ``p_admit``); with prefix routing it looks its
        worker's cache up again (``look_up``). False: it waits."""
        if kv is not None and not admit(kv, entry[0]):
            return False
        if pk is not None and not p_admit(pk, entry[0]):
            return False
        entry[2] = False
        if routing is not None:
            look_up(entry, routing, idx)
        return True

    def form_chunks(queue: deque, budget: int, max_seqs: int, routing: _CacheRouting | None = None, idx: int = 0,
                    kv: _Decoder | None = None, pk: int | None = None) -> tuple[list, int, int]:
        """The next step's chunks from ``queue`` (entries [request, tokens done, not started]), first come first
        served: a prompt that may not start yet (``begin``) holds back those after it."""
        if len(queue) == 1:  # the common case: one prompt, all of it or a budget's worth
            entry = queue[0]
            if entry[2] and not begin(entry, routing, idx, kv, pk):
                return [], 0, 0
            done = entry[1]
            take = min(plen[entry[0]] - done, budget)
            if take <= 0 or max_seqs <= 0:
                return [], 0, 0
            return [(entry, take)], take, take * (done + take)
        chunks, tokens, attn = [], 0, 0
        for entry in queue:
            if budget <= 0 or len(chunks) >= max_seqs or (entry[2] and not begin(entry, routing, idx, kv, pk)):
                break
            r, done = entry[0], entry[1]
            take = min(plen[r] - done, budget)
            chunks.append((entry, take))
            tokens += take
            attn += take * (done + take)
            budget -= take
        return chunks, tokens, attn

    def first_token(r: int, now: float) -> bool:
        """Request r's first token came out at ``now``; True when that was its only token (it is done)."""
        nonlocal inflight
        first[r] = now + overhead - arrival[r]
        if olen[r] > 1:
            return False
        last[r] = first[r]
        inflight -= 1
        d_remove(home[r])
        return True

    def pooled(d: _Decoder) -> bool:
        """Whether d's KV is counted in blocks through its prefix cache (stated blocks counted once), else in
        tokens (``kv_free``)."""
        return keys is not None and d.cache.base > 0

    def d_private(r: int) -> int:
        """Blocks r holds on its decode worker beside its stated ones: the rest of its prompt, and its output."""
        return -(-(plen[r] + olen[r]) // bt) - len(keys[r])

    def p_private(r: int) -> int:
        """Blocks r holds on its prefill worker beside its stated ones: the rest of its prompt."""
        return -(-plen[r] // bt) - len(keys[r])

    def fits(d: _Decoder, r: int) -> bool:
        """Whether r's prompt + output of KV fits in what d's running requests leave."""
        if pooled(d):
            return d.cache.fits(keys[r], d_private(r))
        return plen[r] + olen[r] <= d.kv_free

    def reserve(d: _Decoder, r: int) -> None:
        """Request r takes its prompt + output of d's KV until it finishes."""
        if pooled(d):
            d.cache.take(keys[r], d_private(r))
        else:
            d.kv_free -= plen[r] + olen[r]
        reserved[r] = True

    def admit(d: _Decoder, r: int) -> bool:
        """Whether r's prompt may start on d: its KV fits beside what the requests there hold, or d holds none
        (a prompt larger than the pool still runs alone). Reserves it when so."""
        if pooled(d):
            reserved[r] = d.cache.admit(keys[r], d_private(r))
            return reserved[r]
        if not fits(d, r) and d.kv_free < d.profile.kv_capacity_tokens:
            return False
        reserve(d, r)
        return True

    def release(d: _Decoder, r: int) -> None:
        if pooled(d):
            d.cache.give(keys[r], d_private(r))
        else:
            d.kv_free += plen[r] + olen[r]

    # A prefill worker's pool, where counted in blocks: a prompt holds its blocks from its first chunk until its
    # KV has crossed to its decode worker (``p_out``: heaps of (when, request)), then they are cached.
    p_out: list[list] = [[] for _ in prefillers]

    def p_pooled(p: _Prefiller) -> bool:
        return keys is not None and p.cache.base > 0

    def p_crossed(k: int, now: float) -> None:
        """Prefill worker k's prompts whose KV crossed by ``now`` give their blocks back."""
        out, cache = p_out[k], prefillers[k].cache
        while out and out[0][0] <= now:
            r = pop(out)[1]
            cache.give(keys[r], p_private(r))

    def p_admit(k: int, r: int) -> bool:
        return prefillers[k].cache.admit(keys[r], p_private(r))

    def p_next(p: _Prefiller, k: int, now: float) -> None:
        """Prefill worker k's next step, if a queued prompt may run; else, while it waits for KV to cross, a
        wake-up when the first does."""
        nonlocal seq
        p.step, p.busy = [], False
        if not p.queue:
            return
        chunks, tokens, attn = form_chunks(p.queue, p.budget, p.max_seqs, p_route, k, None,
                                           k if p_pooled(p) else None)
        if chunks:
            p.step, p.busy, when = chunks, True, now + p.pg[tokens] + p.pc * attn
        elif p_out[k]:
            p.busy, when = True, max(now, p_out[k][0][0])
        else:
            raise AssertionError("simulator: a prefill worker waits for KV that nothing will free")
        seq += 1
        push(heap, (when, seq, PREFILL, k, 0))

    def join(d: _Decoder, r: int) -> None:
        """Request r enters d's decode batch at step d.S, its KV reserved now unless it was when its prompt
        started here."""
        if not reserved[r]:
            reserve(d, r)
        d.B += 1
        part = plen[r] - d.S
        d.K += part
        push(d.finish, (d.S + olen[r] - 1, r, part))
        if d.padded:
            push(d.offs, (-part, r))

    def plan_decoder(d: _Decoder, idx: int) -> None:
        """At a boundary (d.t, d.S): join what may join, then schedule the next event."""
        pending = d.pending
        if pending and pending[0][0] <= d.t:
            max_seqs = d.profile.max_num_seqs
            while pending and pending[0][0] <= d.t and d.B < max_seqs:
                r = pending[0][1]
                if d.B and not fits(d, r):
                    break  # waits for a finish to free KV
                pop(pending)
                join(d, r)
                if keys is not None:
                    d.cache.store(keys[r])  # the pulled blocks, and those it had
        if d.local:
            prof = d.profile
            room = prof.max_num_batched_tokens - d.B
            if d.B and prof.prefill_tokens_while_decoding:  # the engine's cap on prompt tokens beside decodes
                room = min(room, prof.prefill_tokens_while_decoding)
            chunks, tokens, attn = form_chunks(d.local, room, prof.max_num_seqs - d.B, d_route, idx, d)
            if chunks:
                x = ctx0(d) + d.B  # the decodes' attention feature in the coming step
                dur = d.pg[tokens + d.B] + d.pc * (attn + x)
                if d.B:  # a mixed step does at least a decode step's work
                    dur = max(dur, d.g[d.B] + d.c * x)
                d.step = chunks
                schedule(d, idx, d.t + dur, 1)
                return
        if d.B:
            k = min(d.finish[0][0] - d.S, jump)
            alpha, beta = series(d)
            if pending and pending[0][0] > d.t:  # stop at the first boundary at or after that KV's arrival
                k = min(k, _steps_until(alpha, beta, pending[0][0] - d.t))
            schedule(d, idx, d.t + _span(alpha, beta, k), k)
        elif pending:
            schedule(d, idx, max(d.t, pending[0][0]), 0)
        else:
            d.event_t = math.inf
            d.version += 1

    def wake(d: _Decoder, idx: int, now: float, when: float) -> None:
        """Something for d arrives at ``when`` (>= now): make sure d stops at the first boundary after it."""
        if d.event_t == math.inf:  # idle
            if d.t < now:
                d.t = now
            if when <= now:
                plan_decoder(d, idx)
            else:
                schedule(d, idx, when, 0)
            return
        if d.step or d.plan_k == 0:
            if d.plan_k == 0 and when < d.event_t:
                schedule(d, idx, when, 0)
            return  # a mixed step or a wake-up is planned: its end looks again
        alpha, beta = series(d)
        k = _steps_until(alpha, beta, when - d.t)
        if k < d.plan_k:
            schedule(d, idx, d.t + _span(alpha, beta, k), k)

    ai = 0
    next_arrival = arrival[0] if n else math.inf
    while True:
        if heap and heap[0][0] <= next_arrival:
            now, _, kind, idx, ver = pop(heap)
            events += 1
            if kind == PREFILL:
                p = prefillers[idx]
                if p_out[idx]:
                    p_crossed(idx, now)
                for entry, take in p.step:
                    entry[1] += take
                    p.queued -= take
                    if p_route is not None and entry[1] < plen[entry[0]]:  # a chunk's blocks are hits for the
                        p.cache.store(keys[entry[0]][: entry[1] // bt], (entry[1] - take) // bt)  # prompts after it
                queue = p.queue
                while queue and queue[0][1] >= plen[queue[0][0]]:
                    r = queue.popleft()[0]
                    p_load.remove(idx)
                    if p_route is not None:
                        p.cache.store(keys[r])
                    if first_token(r, now):
                        if p_pooled(p):
                            p.cache.give(keys[r], p_private(r))
                        continue
                    # the KV the decode worker chosen at arrival lacks crosses to it, over its inbound link
                    dk = home[r]
                    dd = decoders[dk]
                    nbytes = (plen[r] - dhit[r]) * dd.kv_per_token
                    start = max(now, dd.link_free)
                    dd.link_free = start + nbytes * dd.inv_bw
                    ready = dd.link_free + dd.fixed_s
                    kv_bytes += nbytes
                    push(dd.pending, (ready, r))
                    wake(dd, dk, now, ready)
                    if p_pooled(p):
                        push(p_out[idx], (ready, r))
                if p_route is not None:
                    p_route.lowered(idx)  # fewer tokens queued, maybe fewer requests
                p_next(p, idx, now)
                continue
            d = decoders[idx]
            if ver != d.version:
                continue  # superseded
            S = d.S = d.S + d.plan_k
            d.t = now
            d.event_t = math.inf
            if d.step:
                for entry, take in d.step:
                    entry[1] += take
                    d.queued -= take
                    if d_route is not None and entry[1] < plen[entry[0]]:  # (a finished prompt: stored below)
                        d.cache.store(keys[entry[0]][: entry[1] // bt], (entry[1] - take) // bt)
                d.step = []
                if d_route is not None:
                    d_route.lowered(idx)  # fewer tokens queued
                local = d.local
                while local and local[0][1] >= plen[local[0][0]]:
                    r = local.popleft()[0]
                    if d_route is not None:
                        d.cache.store(keys[r])
                    if first_token(r, now):
                        release(d, r)
                        continue
                    join(d, r)  # joins the batch it was prefilled beside
            fin = d.finish
            while fin and fin[0][0] <= S:
                _, r, part = pop(fin)
                last[r] = now + overhead - arrival[r]
                d.B -= 1
                d.K -= part
                release(d, r)
                inflight -= 1
                d_remove(idx)
            plan_decoder(d, idx)
            continue
        if ai >= n:
            break
        # an arrival
        r = ai
        now = next_arrival
        ai += 1
        next_arrival = arrival[ai] if ai < n else math.inf
        events += 1
        if inflight >= max_inflight:
            rejected[r] = True
            num_rejected += 1
            continue
        inflight += 1
        length = plen[r]
        if d_route is None:
            dk, hit = d_load.pick(), 0
        else:
            dk, hit = d_route.pick(keys[r], length)
        d_load.add(dk)
        home[r] = dk
        if not prefillers or length - hit <= threshold:
            local_prefills += 1
            cached_tokens += hit
            d = decoders[dk]
            d.local.append([r, hit, True])  # [request, tokens done, not started: its cache looked up again]
            d.queued += length - hit
            wake(d, dk, now, now)
        else:
            remote_prefills += 1
            dhit[r] = hit
            if p_route is None:
                pk, hit = p_load.pick(), 0
            else:
                pk, hit = p_route.pick(keys[r], length)
            cached_tokens += hit
            p_load.add(pk)
            p = prefillers[pk]
            p.queue.append([r, hit, True])
            p.queued += length - hit
            if not p.busy and p_pooled(p):  # an idle worker: starts now if its KV fits
                p_crossed(pk, now)
                p_next(p, pk, now)
            elif not p.busy:  # an idle prefill worker's queue held nothing before this prompt
                p.queue[0][2] = False  # starts now: its cache was just looked up
                if p_route is not None:
                    p.cache.restore(keys[r][: hit // bt])
                take = min(length - hit, p.budget)
                p.step = [(p.queue[0], take)]
                p.busy = True
                seq += 1
                push(heap, (now + p.pg[take] + p.pc * take * (hit + take), seq, PREFILL, pk, 0))

    if any(w.queued for w in (*prefillers, *decoders)):  # every queued prompt token was prefilled, or found cached
        raise AssertionError("simulator: prompt tokens left queued at the end: " +
                             str([w.queued for w in (*prefillers, *decoders)]))
    stats = {"local_prefills": local_prefills, "remote_prefills": remote_prefills, "kv_bytes": kv_bytes,
             "rejected": num_rejected, "cached_prompt_tokens": cached_tokens}
    ttft = np.asarray(first, dtype=float)
    e2e = np.asarray(last, dtype=float)
    done_at = e2e + work.arrival
    duration = float(np.nanmax(done_at) - work.arrival[0]) if n and not np.all(np.isnan(done_at)) else 0.0
    return SimResult(ttft=ttft, e2e=e2e, prompt_len=work.prompt_len, output_len=work.output_len, arrival=work.arrival,
                     rejected=np.asarray(rejected), duration=duration, events=events,
                     wall_s=time.perf_counter() - wall0, stats=stats)


def met_slo(result: SimResult, slo, skip: int = 0) -> np.ndarray:
    """Per request (from index ``skip`` on): admitted and within every latency target of ``slo``."""
    ok = ~result.rejected[skip:]
    ttft, e2e, tpot = result.ttft[skip:], result.e2e[skip:], result.tpot[skip:]
    if slo.itl is not None:
        raise ValueError("the simulator does not model single inter-token gaps: use a TPOT target, not ITL")
    with np.errstate(invalid="ignore"):
        if slo.ttft is not None:
            ok &= ttft <= slo.ttft
        if slo.tpot is not None:
            ok &= np.isnan(tpot) | (tpot <= slo.tpot)
        if slo.e2e is not None:
            ok &= e2e <= slo.e2e
    return ok


def summarize_sim(result: SimResult, slo, price_per_hour: float | None = None) -> dict:
    """The same summary as a measured run (``tokenworks.bench.metrics.summary``)."""
    from tokenworks.bench.metrics import summary

    done = ~result.rejected
    errors = {"HTTP 429": int(result.rejected.sum())} if result.rejected.any() else {}
    s = summary(requests=len(result.ttft), errors=errors, wall=result.duration, slo=slo,
                met=int(met_slo(result, slo).sum()), input_tokens=int(result.prompt_len[done].sum()),
                output_tokens=int(result.output_len[done].sum()), ttft=result.ttft[done],
                tpot=result.tpot[done & (result.output_len > 1)], itl=[], e2e=result.e2e[done],
                price_per_hour=price_per_hour, cached_tokens=result.stats.get("cached_prompt_tokens"))
    s["simulated"] = {"events": result.events, "wall_s": result.wall_s, **result.stats}
    return s


def as_request_results(result: SimResult) -> list:
    """The simulated requests as ``RequestResult`` objects, for the reports and plots of ``tokenworks bench``."""
    from tokenworks.bench.client import RequestResult

    out = []
    for i in range(len(result.ttft)):
        t0 = float(result.arrival[i] - result.arrival[0])
        if result.rejected[i]:
            out.append(RequestResult(index=i, scheduled=t0, start=t0, error="HTTP 429: rejected by admission"))
            continue
        out.append(RequestResult(index=i, scheduled=t0, start=t0, ttft=float(result.ttft[i]), e2e=float(result.e2e[i]),
                                 prompt_tokens=int(result.prompt_len[i]), output_tokens=int(result.output_len[i])))
    return out


def simulate_session(deployments: dict[str, Deployment], requests: list[tuple[int, int]],
                     arrivals: list[list[float]], labels: list[str], xs: list[float], slo, attainment: float,
                     out_dir: str, title: str, notes: list[str], max_detail: int = 200_000,
                     prefix: tuple[list, int] | None = None) -> dict:
    """Simulate each deployment at each load and write the report ``tokenworks bench`` writes
    (summary.json, report.md, plots; per-request JSONL when there are at most ``max_detail`` requests).
    ``prefix``: the requests' shared blocks and tokens a block (``SimWorkload.prefix_blocks``), or None."""
    import os

    from tokenworks.bench.report import write_report, write_requests

    os.makedirs(out_dir, exist_ok=True)
    prompt = np.array([p for p, _ in requests], dtype=np.int64)
    output = np.array([o for _, o in requests], dtype=np.int64)
    runs: dict[str, list] = {}
    for name, dep in deployments.items():
        runs[name] = []
        for k, (times, label, x) in enumerate(zip(arrivals, labels, xs)):
            blocks = prefix[0][: len(times)] if prefix else None
            result = simulate(dep, SimWorkload(times, prompt[: len(times)], output[: len(times)], blocks,
                                               prefix[1] if prefix else 0))
            s = summarize_sim(result, slo, dep.price_per_hour)
            s["load"] = label
            s["deployment"] = dep.describe()
            detail = as_request_results(result) if len(times) <= max_detail else []
            runs[name].append((x, s, detail))
            if detail:
                safe = name.replace(" ", "_").replace("/", "_")
                write_requests(os.path.join(out_dir, f"requests-{safe}-{k}.jsonl"), detail)
    with_plots = all(detail for sweep in runs.values() for _, _, detail in sweep)
    return write_report(out_dir, title, runs, slo, attainment, notes + ["simulated: ITL is not modelled (TPOT is)"],
                        extra={"simulated": True}, with_plots=with_plots)
