"""Where each phase runs: one cost for every candidate worker, conditional disaggregation.

``routing="kv"`` (the default) sends a request where its first token is predicted soonest, the estimate
admission uses too (router/admission.py):

    (prompt tokens queued on the worker for prefill + overlap_weight x this prompt's tokens not in its prefix cache)
    / the worker's prefill tokens per second under backlog

The prefix cache is known exactly: workers publish the blocks they store and
evict (router/kv_index.py). A worker whose rate is not measured yet is given
the best measured rate (no rate anywhere yet: the cost is in tokens). Equal
costs (idle workers, no hits) go to the one with fewer requests in flight.
A weight above 1 favours hits beyond what they save in prefill time (to keep
sessions together); 0 routes by queued prefill alone. The decode worker is the
cheapest decode-capable one; if the prompt's part it does not hold is at most
``local_prefill_threshold`` tokens it prefills there, else the cheapest
prefill worker does (judged by the same cost).

Baselines, for benchmarks/routing.py and for comparison in production:
``prefix`` (the longest prefix hit wins, load only breaks ties: the most
hits an index can give), ``least-loaded`` (fewest requests in flight, prefix
breaks ties) and ``round-robin``. An earlier cost, overlap + the prompt tokens
of every request active on the worker (Dynamo's rule, in tokens), lost to
least-loaded on this CPU, where a prefill costs far more than a decode row
(docs/routing.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenworks.engine.block_pool import hash_block
from tokenworks.router.admission import FirstTokenRates
from tokenworks.router.kv_index import KVIndex


@dataclass
class WorkerView:
    worker_id: str
    role: str
    inflight: int = 0  # requests the router has placed here and not seen finish
    queue_depth: int = 0  # waiting on the worker, from its last stats
    alive: bool = True
    draining: bool = False  # being removed: finishes what it holds, takes nothing new
    active_tokens: int = 0  # prompt tokens of the requests placed here and not finished (for decode: their KV)
    queued_prefill_tokens: int = 0  # tokens sent here to prefill whose first token has not come back
    rates: FirstTokenRates = field(default_factory=FirstTokenRates)  # its prefill speed under backlog

    @property
    def load(self) -> int:
        return self.inflight + self.queue_depth


@dataclass
class Choice:
    worker: WorkerView
    hit_tokens: int  # prompt tokens in its prefix cache
    cost: float  # predicted seconds to its first token there (tokens while no rate is measured)


@dataclass
class Placement:
    decode: WorkerView
    prefill: WorkerView | None  # None: prefill on the decode worker
    cached_tokens: int  # the decode worker's prefix hit (exact, from its KV events)
    uncached_tokens: int  # what the prefilling worker will compute
    reason: str  # "prefix": the chosen decode worker holds part of the prompt; "load": it holds none
    costs: dict[str, float]  # every candidate's cost (for /debug/routing)


ROUTINGS = ("kv", "prefix", "least-loaded", "round-robin")


class RoutingPolicy:
    def __init__(self, block_size: int, local_prefill_threshold: int, index: KVIndex | None = None,
                 overlap_weight: float = 1.0, routing: str = "kv") -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        self.block_size = block_size
        self.local_prefill_threshold = local_prefill_threshold
        self.index = index or KVIndex()
        self.overlap_weight = overlap_weight
        self.routing = routing
        self._turn = 0  # round-robin's position

    def block_hashes(self, token_ids: list[int]) -> list[int]:
        out: list[int] = []
        bs = self.block_size
        # The engine never reuses the block holding the last prompt token (its logits are needed).
        for i in range((len(token_ids) - 1) // bs if token_ids else 0):
            out.append(hash_block(out[-1] if out else None, token_ids[i * bs : (i + 1) * bs]))
        return out

    def overlap_tokens(self, worker: WorkerView, hashes: list[int]) -> int:
        return self.index.overlap_blocks(worker.worker_id, hashes) * self.block_size

    def choose(self, workers: list[WorkerView], hashes: list[int], num_tokens: int,
               peek: bool = False) -> tuple[Choice, dict[str, float]]:
        known = [w.rates.tokens.rate for w in workers if w.rates.tokens.rate > 0]
        fallback = max(known) if known else 1.0
        choices = []
        for w in workers:
            hit = self.overlap_tokens(w, hashes)
            work = w.queued_prefill_tokens + self.overlap_weight * (num_tokens - hit)
            choices.append(Choice(w, hit, work / (w.rates.tokens.rate or fallback)))
        if self.routing == "kv":
            best = min(choices, key=lambda c: (c.cost, c.worker.inflight, c.worker.active_tokens, c.worker.worker_id))
        elif self.routing == "prefix":
            best = min(choices, key=lambda c: (-c.hit_tokens, c.worker.active_tokens, c.worker.worker_id))
        elif self.routing == "least-loaded":
            best = min(choices, key=lambda c: (c.worker.load, -c.hit_tokens, c.worker.worker_id))
        else:
            turn = self._turn + 1
            if not peek:
                self._turn = turn
            best = sorted(choices, key=lambda c: c.worker.worker_id)[turn % len(choices)]
        return best, {c.worker.worker_id: c.cost for c in choices}

    def place(self, workers: list[WorkerView], token_ids: list[int], peek: bool = False) -> Placement:
        """Where the request would go; ``peek``: only asking (admission), so round-robin does not move on."""
        decoders = [w for w in workers if w.alive and not w.draining and w.role in ("decode", "both")]
        if not decoders:
            raise LookupError("no decode-capable worker is available")
        hashes = self.block_hashes(token_ids)
        n = len(token_ids)
        best, costs = self.choose(decoders, hashes, n, peek)
        reason = "prefix" if best.hit_tokens else "load"
        uncached = n - best.hit_tokens
        prefillers = [w for w in workers if w.alive and not w.draining and w.role == "prefill"]
        if not prefillers or uncached <= self.local_prefill_threshold:
            return Placement(best.worker, None, best.hit_tokens, uncached, reason, costs)
        pre, pre_costs = self.choose(prefillers, hashes, n, peek)
        return Placement(best.worker, pre.worker, best.hit_tokens, n - pre.hit_tokens, reason, {**costs, **pre_costs})
