"""The router's core: worker registry, request flow across phases, streams, metrics.

For each request: place it (policy), then either run it whole on a decode
worker (local prefill) or send it to a prefill worker first, stream that
worker's first token at once, and hand the request with the prefill
worker's KV card and block ids to the decode worker, which pulls the KV and
streams the rest. Leaving the stream early aborts it on every worker that
holds state for it.

Workers send token ids, one message per engine step for all their requests;
the router fans them out to the request streams and turns tokens into text
with one detokenizer per stream, which also finds stop strings (the request
is then aborted on its worker, which frees its KV at its next step). In
steady decoding a stream's tokens go from the reader straight to the client
(router/stream.py's lane), one event for the steps one reader turn reads; the
rest goes through the request's task here.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from tokenworks.codec import Codec
from tokenworks.router.admission import COLD_RETRY_AFTER
from tokenworks.router.kv_index import KVIndex
from tokenworks.router.policy import RoutingPolicy, WorkerView
from tokenworks.router.stream import RequestStream
from tokenworks.sampling_params import SamplingParams
from tokenworks.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenworks.worker import protocol as P

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class WorkerUnavailable(RuntimeError):
    pass


class NoWorkerAvailable(WorkerUnavailable):
    """No worker can take the request now (as opposed to one dying under it)."""


class RequestFailed(RuntimeError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class WorkerHandle:
    ready: P.Ready
    sock: zmq.asyncio.Socket
    view: WorkerView
    stats: P.Stats | None = None
    last_seen: float = field(default_factory=time.monotonic)
    dead: bool = False  # its process is known to have exited
    told_gone: bool = False  # the workers that pull KV were told it is gone (P.PeerGone), since it was last alive

    def alive(self, heartbeat_timeout: float) -> bool:
        return not self.dead and time.monotonic() - self.last_seen < heartbeat_timeout


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tokenworks:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("tokenworks:inter_token_latency_seconds", "Gap between streamed tokens", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("tokenworks:e2e_request_latency_seconds", "Request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("tokenworks:prompt_tokens", "Prompt tokens processed", registry=r)
        # per finished request, as vLLM's request_prompt_tokens, request_generation_tokens and
        # request_time_per_output_token_seconds: the traffic's shape, for dashboards
        self.request_prompt = Histogram("tokenworks:request_prompt_tokens", "Prompt tokens of a finished request",
                                        registry=r, buckets=_TOKEN_BUCKETS)
        self.request_generation = Histogram("tokenworks:request_generation_tokens",
                                            "Tokens a finished request generated", registry=r, buckets=_TOKEN_BUCKETS)
        self.request_tpot = Histogram("tokenworks:request_time_per_output_token_seconds",
                                      "A finished request's mean gap between its tokens after the first", registry=r,
                                      buckets=_LATENCY_BUCKETS)
        self.requests = Counter("tokenworks:requests", "Finished requests", ["finish_reason"], registry=r)
        self.running = Gauge("tokenworks:num_requests_running", "Requests in flight at the router", registry=r)
        self.prefills = Counter("tokenworks:prefills", "Prefills by where they ran", ["where"], registry=r)
        self.kv_bytes = Counter("tokenworks:kv_transfer_bytes", "KV bytes moved between workers", registry=r)
        self.kv_seconds = Histogram("tokenworks:kv_transfer_seconds", "Time from decode submit to KV in place",
                                    registry=r, buckets=_LATENCY_BUCKETS)
        self.kv_fallbacks = Counter("tokenworks:kv_transfer_fallbacks", "Failed KV pulls recomputed locally", registry=r)
        self.kv_failures = Counter("tokenworks:kv_transfer_failures", "Failed KV pulls by cause", ["cause"], registry=r)
        self.tokens_after_stop = Counter("tokenworks:tokens_after_stop", "Tokens workers generated after a stop "
                                         "string ended the request at the router (discarded)", registry=r)
        self.unhealthy = Counter("tokenworks:worker_unhealthy", "Workers that reported a broken part and left",
                                 ["reason"], registry=r)
        self.worker_deaths = Counter("tokenworks:worker_deaths", "Worker processes seen to exit", registry=r)
        self.failovers = Counter("tokenworks:request_failovers", "Requests continued on another worker", registry=r)
        self.rejected = Counter("tokenworks:requests_rejected", "Requests answered 429", ["reason"], registry=r)
        self.queue = Gauge("tokenworks:worker_num_requests_waiting", "Requests waiting on a worker", ["worker"], registry=r)
        self.worker_running = Gauge("tokenworks:worker_num_requests_running", "Requests running on a worker", ["worker"],
                                    registry=r)
        self.blocks_used = Gauge("tokenworks:worker_kv_blocks_used", "KV blocks in use on a worker", ["worker"], registry=r)
        self.blocks_total = Gauge("tokenworks:worker_kv_blocks_total", "KV blocks on a worker", ["worker"], registry=r)
        self.draft_tokens = Counter("tokenworks:spec_decode_num_draft_tokens", "Draft tokens checked by speculative "
                                    "decoding (--num-speculative-tokens)", ["worker"], registry=r)
        self.accepted_tokens = Counter("tokenworks:spec_decode_num_accepted_tokens", "Draft tokens the model "
                                       "accepted", ["worker"], registry=r)
        self.routed = Counter("tokenworks:router_decisions", "Decode placements by reason: prefix (the worker holds "
                              "part of the prompt) or load (no worker does)", ["reason"], registry=r)
        self.predicted_hit_tokens = Counter("tokenworks:router_predicted_hit_tokens", "Prompt tokens the router "
                                            "found in the chosen decode worker's prefix cache (its KV index)", registry=r)
        self.cached_prompt_tokens = Counter("tokenworks:prompt_tokens_cached", "Prompt tokens the prefilling worker "
                                            "found in its prefix cache", registry=r)


class _ReadAtScrape:
    """A counter the hot path keeps as a plain int (no lock and no call per token), read when /metrics is scraped."""

    def __init__(self, name: str, documentation: str, read) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


@dataclass
class Delta:
    """What one step of one request adds, as the API layer sees it."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    logprobs: list[P.LogprobEntry]
    num_cached_tokens: int = 0  # prompt tokens found in the worker's prefix cache
    prompt_logprobs: list[P.LogprobEntry | None] | None = None  # SamplingParams.prompt_logprobs: the first delta's

    def extend(self, later: Delta) -> None:
        """Add a later step's unfinished delta of the same request to this unfinished one."""
        self.token_ids = self.token_ids + later.token_ids
        self.text += later.text
        if later.logprobs:
            self.logprobs = self.logprobs + later.logprobs


@dataclass
class _WorkerLost:
    """Put in a request's stream when the worker it waits on is dead or silent."""

    worker_id: str


class _Ledger:
    """What one attempt's outputs add up to, taken the same way by the attempt's task and by its lane: the text
    (through the request's detokenizer, which finds stop strings), the token metrics, and the prefilling
    worker's measured rate once the first token is in."""

    __slots__ = ("router", "detok", "t0", "prefiller", "uncached", "first", "first_at", "last", "stopped",
                 "generated", "max_tokens", "cached")

    def __init__(self, router: Router, detok: IncrementalDetokenizer | None, t0: float, prefiller: WorkerView,
                 uncached: int, max_tokens: int) -> None:
        self.router, self.detok, self.t0, self.prefiller, self.uncached = router, detok, t0, prefiller, uncached
        self.first = True  # no token yet
        self.first_at = t0  # when the first token came
        self.cached = 0  # prompt tokens the prefilling worker found in its prefix cache
        self.last = t0  # when the last token came
        self.stopped = False  # a stop string ended the request here while its worker still runs it
        self.generated = 0  # tokens so far
        self.max_tokens = max_tokens

    def take(self, out: P.Output) -> Delta:
        now = time.monotonic()
        tokens, text = out.new_token_ids, ""
        detok = self.detok
        if detok is not None:
            end = len(tokens) - 1
            for k, t in enumerate(tokens):
                text += detok.add_token(t, final=out.finished and k == end)
                if detok.stopped:
                    tokens, self.stopped = tokens[: k + 1], not out.finished
                    break
        if tokens:
            router = self.router
            m = router.metrics
            if self.first:
                m.ttft.observe(now - self.t0)
                self.first_at = now
                self.cached = out.num_cached_tokens
                m.prompt_tokens.inc(out.num_prompt_tokens)
                m.cached_prompt_tokens.inc(out.num_cached_tokens)
                self.first = False
                self.prefiller.queued_prefill_tokens -= self.uncached
                self.prefiller.rates.done(now, max(1, out.num_prompt_tokens - out.num_cached_tokens))
            else:
                m.itl.observe(now - self.last)
            self.last = now
            self.generated += len(tokens)
            router.generated_tokens += len(tokens)  # tokenworks:generation_tokens_total
        return Delta(tokens, text, out.finished or self.stopped, "stop" if self.stopped else out.finish_reason,
                     out.num_prompt_tokens,
                     self.router._named(out.logprobs[: len(tokens)]) if out.logprobs else [], out.num_cached_tokens,
                     self.router._named(out.prompt_logprobs) if out.prompt_logprobs else None)


class Router:
    def __init__(self, *, block_size: int, local_prefill_threshold: int, heartbeat_timeout: float = 5.0,
                 max_inflight: int = 256, max_queue_wait: float = 30.0, max_failovers: int = 3,
                 failover_wait: float = 20.0, internal_host: str = "127.0.0.1", secret: bytes | None = None,
                 price_per_worker_hour: float | None = None, tokenizer: Tokenizer | None = None,
                 overlap_weight: float = 1.0, routing: str = "kv") -> None:
        self.ctx = zmq.asyncio.Context.instance()
        # A plain socket, drained from the event loop's own poll of its descriptor (start()): one wake-up reads
        # every message that has come, with none of an asyncio socket's per-message futures.
        self.events = zmq.Socket(self.ctx, zmq.PULL)
        port = self.events.bind_to_random_port(f"tcp://{internal_host}")
        self.events_endpoint = f"tcp://{internal_host}:{port}"
        self.workers: dict[str, WorkerHandle] = {}
        self.kv_index = KVIndex()  # which worker holds which prefix block, from their KV events
        self.policy = RoutingPolicy(block_size, local_prefill_threshold, self.kv_index, overlap_weight, routing)
        self.decisions: deque[dict] = deque(maxlen=100)  # the latest placements and why (/debug/routing)
        self.metrics = Metrics()
        Gauge("tokenworks:kv_index_blocks", "Prefix blocks in the router's KV index (all workers)",
              registry=self.metrics.registry).set_function(lambda: self.kv_index.num_entries)
        Gauge("tokenworks:kv_index_bytes", "Approximate memory of the router's KV index",
              registry=self.metrics.registry).set_function(lambda: self.kv_index.nbytes)
        self.heartbeat_timeout = heartbeat_timeout
        self.streams: dict[str, RequestStream] = {}
        self._decoding: dict[str, dict[str, _Ledger]] = {}  # decode worker -> its requests' ledgers (admission)
        self._typical_use: float | None = None  # the share of its max_tokens a finished request used, averaged
        self._held: list[tuple[RequestStream, Callable[[], None]]] = []  # lanes' steps to write after this turn
        self._waiting_on: dict[str, WorkerHandle] = {}  # request id -> the worker its stream waits on
        self._stopped: dict[str, float] = {}  # requests a stop string ended here -> when (their late tokens count)
        self.tokenizer = tokenizer  # None: no text, token ids only
        self._ids = itertools.count()
        self._to_worker = Codec(P.ToWorker, secret)
        self._from_worker = Codec(P.FromWorker, secret)
        self.num_refused_messages = 0  # malformed, unsigned or badly signed
        self._watchdog: asyncio.Task | None = None
        self._expected: set[str] = set()  # ids of the workers this router started
        self.max_model_len = 0
        self.max_failovers = max_failovers
        self.failover_wait = failover_wait  # how long a request waits for a decode worker to come back
        # Admission control: at most max_inflight requests, and no new one whose predicted wait for its
        # first token (router/admission.py) exceeds max_queue_wait.
        self.max_inflight = max_inflight
        self.max_queue_wait = max_queue_wait
        self._admitted: deque[float] = deque()  # admission times of requests whose streams do not exist yet
        self.generated_tokens = 0
        # the requests finished lately: (when, prompt tokens, of them cached, tokens generated); the traffic the
        # autoscaler plans for (launch/autoscale.py)
        self.finished: deque[tuple[float, int, int, int]] = deque(maxlen=20_000)
        self.arrived: deque[float] = deque(maxlen=100_000)  # when each request came (its demand)
        self.metrics.registry.register(_ReadAtScrape("tokenworks:generation_tokens", "Tokens generated",
                                                     lambda: self.generated_tokens))
        if price_per_worker_hour is not None:
            self._cost_metrics(price_per_worker_hour)

    def _cost_metrics(self, price: float) -> None:
        """Cost per token on /metrics: the fleet's price per hour (live workers x price) and what a million
        generated tokens have cost since the router started."""
        spent = [0.0, time.monotonic()]  # dollars so far, when last added up

        def per_hour() -> float:
            return price * sum(1 for w in self.workers.values() if not w.dead)

        def dollars() -> float:
            now = time.monotonic()
            spent[0] += per_hour() * (now - spent[1]) / 3600
            spent[1] = now
            return spent[0]

        r = self.metrics.registry
        Gauge("tokenworks:fleet_price_per_hour", "Price per hour of the live workers (USD)", registry=r).set_function(
            per_hour)
        Gauge("tokenworks:cost_dollars", "What the workers have cost since the router started (USD)",
              registry=r).set_function(dollars)
        Gauge("tokenworks:cost_per_million_output_tokens", "USD per million generated tokens since start",
              registry=r).set_function(lambda: dollars() / self.generated_tokens * 1e6 if self.generated_tokens else 0.0)

    # -- workers -------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.events.FD, self._read_events)
        loop.call_soon(self._read_events)  # the descriptor signals changes only: read what came before
        self._watchdog = loop.create_task(self._watch())

    def close(self) -> None:
        """Stop hearing the workers (the reader and the watchdog) and close the router's sockets."""
        asyncio.get_running_loop().remove_reader(self.events.FD)
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.events.close(0)
        for h in self.workers.values():
            h.sock.close(0)

    async def _watch(self, interval: float = 0.2) -> None:
        """Tell the streams waiting on a worker that died or went silent (one timer for all streams)."""
        while True:
            await asyncio.sleep(interval)
            self._notify_lost(lambda h: not h.alive(self.heartbeat_timeout))
            await self._tell_sources_gone()
            old = time.monotonic() - 10.0
            for rid in [r for r, t in self._stopped.items() if t < old]:
                del self._stopped[rid]

    async def _tell_sources_gone(self) -> None:
        """Tell the workers that pull KV (decode and aggregated) of each KV source that died or went silent, once
        until it is heard again: their pulls from it fail now, not at --kv-timeout, and they recompute."""
        for h in list(self.workers.values()):
            if h.alive(self.heartbeat_timeout):
                h.told_gone = False  # a pause, not a death: a later one is told again
                continue
            if h.told_gone or h.ready.kv_peer is None:
                continue
            h.told_gone = True
            notice = P.PeerGone(h.ready.worker_id, h.ready.kv_peer.card)
            pullers = [o for o in self.workers.values() if o is not h and o.ready.role != "prefill"
                       and o.alive(self.heartbeat_timeout)]
            for o in pullers:
                await self.send(o, notice)

    def _notify_lost(self, lost) -> None:
        for rid, handle in list(self._waiting_on.items()):
            if lost(handle):
                del self._waiting_on[rid]
                stream = self.streams.get(rid)
                if stream is not None:
                    stream.put(_WorkerLost(handle.ready.worker_id))

    def expect(self, worker_id: str) -> None:
        """Take the Ready of a worker this router is starting (its command endpoint comes with it)."""
        self._expected.add(worker_id)

    def _register(self, ready: P.Ready) -> None:
        if ready.worker_id not in self._expected:
            return  # not a worker this router started
        old = self.workers.get(ready.worker_id)
        if old is not None:
            old.sock.close(0)
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(ready.commands_endpoint)
        self.workers[ready.worker_id] = WorkerHandle(ready, sock, WorkerView(ready.worker_id, ready.role))
        self.kv_index.reset(ready.worker_id, ready.cached_block_hashes, ready.num_blocks, ready.host_block_hashes,
                            ready.num_host_blocks)
        self._refresh_max_model_len()

    def _refresh_max_model_len(self) -> None:
        """The longest context every worker takes (0 with no worker)."""
        self.max_model_len = min((w.ready.max_model_len for w in self.workers.values()), default=0)

    def _read_events(self, batch: int = 256) -> None:
        """The messages the workers have sent so far (called when the socket's descriptor is readable); after
        ``batch`` of them the loop's other work goes first and the rest are read in the next turn."""
        events = self.events
        for _ in range(batch):
            if not events.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # (the descriptor also wakes us for zmq's own work)
                return
            raw = events.recv(zmq.NOBLOCK)
            try:
                self._on_message(raw)
            except Exception:  # noqa: BLE001 - one bad message must not stop the router hearing its workers
                traceback.print_exc()
        asyncio.get_running_loop().call_soon(self._read_events)

    def _hold(self, stream: RequestStream, write: Callable[[], None]) -> None:
        """A lane holds a step for ``stream``: ``write`` runs once the reader's turn is over. When the router keeps
        up, a turn reads one step and this costs one extra callback a turn; when it falls behind its workers, a
        turn reads several steps and each stream gets one event (and one socket write) for all of them, so the
        router's cost per token falls as its load rises, as vLLM's output collector merges the outputs a slow
        consumer has not yet taken."""
        held = self._held
        if not held:
            asyncio.get_running_loop().call_soon(self._write_held)
        held.append((stream, write))

    def _write_held(self) -> None:
        held, self._held = self._held, []
        for stream, write in held:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - the request's task raises it, as for a lane's error
                stream.put(e)

    def _on_message(self, raw: bytes) -> None:
        try:
            msg = self._from_worker.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            self.num_refused_messages += 1
            return
        if isinstance(msg, P.Ready):
            self._register(msg)
            return
        handle = self.workers.get(msg.worker_id)
        if handle is not None:
            handle.last_seen = time.monotonic()
        if isinstance(msg, P.Unhealthy):
            print(f"[tokenworks] worker {msg.worker_id} is unhealthy: {msg.reason}", file=sys.stderr, flush=True)
            self.metrics.unhealthy.labels(msg.reason.split(":")[0]).inc()
            self.mark_dead(msg.worker_id)
            return
        if isinstance(msg, P.Outputs):
            streams = self.streams
            for out in msg.outputs:
                stream = streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                elif out.request_id in self._stopped:
                    self.metrics.tokens_after_stop.inc(len(out.new_token_ids))
            return
        if isinstance(msg, P.KVEvents):
            self.kv_index.apply(msg.worker_id, msg.events)
            return
        if isinstance(msg, P.Stats):
            if handle is not None:
                last, handle.stats = handle.stats, msg
                m, w = self.metrics, msg.worker_id
                if msg.draft_tokens:  # totals since the worker process started (a restarted one gets a new handle)
                    m.draft_tokens.labels(w).inc(msg.draft_tokens - (last.draft_tokens if last else 0))
                    m.accepted_tokens.labels(w).inc(msg.accepted_draft_tokens
                                                    - (last.accepted_draft_tokens if last else 0))
                handle.view.queue_depth = msg.num_waiting
                m.queue.labels(w).set(msg.num_waiting)
                m.worker_running.labels(w).set(msg.num_running)
                m.blocks_used.labels(w).set(msg.blocks_used)
                m.blocks_total.labels(w).set(msg.blocks_total)
            return
        stream = self.streams.get(msg.request_id)
        if stream is not None:
            stream.put(msg)

    async def send(self, worker: WorkerHandle, msg: P.ToWorker) -> None:
        await worker.sock.send(self._to_worker.encode(msg))

    def view(self) -> list[WorkerView]:
        for h in self.workers.values():
            h.view.alive = h.alive(self.heartbeat_timeout)
        return [h.view for h in self.workers.values()]

    def mark_dead(self, worker_id: str) -> None:
        """The launcher saw the worker's process exit: stop routing to it now, not after the heartbeat timeout."""
        handle = self.workers.get(worker_id)
        if handle is not None and not handle.dead:
            handle.dead = True
            handle.view.alive = False
            self.kv_index.drop(worker_id)  # its cache died with it; a restart's Ready brings the new one
            self.metrics.worker_deaths.inc()
            self._notify_lost(lambda h: h is handle)

    def drain(self, worker_id: str) -> None:
        """Route nothing new to the worker; what it holds goes on."""
        self.workers[worker_id].view.draining = True

    def undrain(self, worker_id: str) -> None:
        """Route to the worker again (its drain was called off)."""
        self.workers[worker_id].view.draining = False

    def drained(self, worker_id: str) -> bool:
        """No request placed on the worker is unfinished (nor waits to hand its prompt over to it)."""
        v = self.workers[worker_id].view
        return v.inflight == 0 and v.active_tokens == 0 and v.queued_prefill_tokens == 0

    def remove(self, worker_id: str) -> None:
        """Forget a drained worker (its process is being stopped)."""
        handle = self.workers.pop(worker_id, None)
        self._expected.discard(worker_id)
        if handle is not None:
            handle.sock.close(0)
            self.kv_index.drop(worker_id)
        self._refresh_max_model_len()

    async def wait_for_decoder(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(v.alive and v.role in ("decode", "both") for v in self.view()):
                return True
            await asyncio.sleep(0.1)
        return False

    async def shutdown_workers(self) -> None:
        for h in self.workers.values():
            await self.send(h, P.Shutdown())

    # -- requests ------------------------------------------------------------------------

    def admission_check(self, prompt: list[int], n: int = 1) -> float | None:
        """None to admit; else the seconds a client should wait before retrying (429 Retry-After).

        Refused when max_inflight requests are in flight, or when the first token is predicted to take longer
        than max_queue_wait on the worker that would prefill it (the placement the router would make now)."""
        now = time.monotonic()
        while self._admitted and self._admitted[0] < now - 5.0:  # admitted but never started: forget
            self._admitted.popleft()
        inflight = len(self.streams) + len(self._admitted)
        if inflight + n > self.max_inflight:
            self.metrics.rejected.labels("queue_full").inc()
            return max(1.0, self.max_queue_wait / 4)
        try:
            placement = self.policy.place(self.view(), prompt, peek=True)
        except LookupError:
            placement = None  # no worker now: generate() answers 503 or waits for one
        if placement is not None:
            w = placement.prefill or placement.decode
            # behind a full batch: a slot first, then its prefill after those queued before it
            wait = (w.rates.predicted_wait(w.queued_prefill_tokens, placement.uncached_tokens, now, copies=n)
                    + self._slot_wait(placement.decode.worker_id, n))
            if wait > self.max_queue_wait:
                self.metrics.rejected.labels("predicted_wait").inc()
                if math.isinf(wait):  # no rate measured yet and COLD_QUEUE waiting
                    return COLD_RETRY_AFTER
                return max(1.0, min(wait - self.max_queue_wait, self.max_queue_wait))
        # Counted until generate() starts and registers its stream (that happens in a task, later).
        self._admitted.extend([now] * n)
        return None

    def _slot_wait(self, worker_id: str, n: int) -> float:
        """Seconds until the decode worker has a free slot for ``n`` more requests, when its running and waiting
        requests already fill its ``max_num_seqs``: the soonest finishes among those running (what each has left
        of the share of its max_tokens requests typically use, all of it until one has finished), times the
        worker's step time. 0 when a slot is free or nothing is measured yet. The first-token rates cannot see
        this: measured while slots were free, they go on admitting behind a batch that started together and
        finishes together. Admission adds it to the first-token wait: with its slot the request still waits for
        its prefill behind the others that got theirs with it."""
        h = self.workers.get(worker_id)
        ledgers = self._decoding.get(worker_id)
        if h is None or not ledgers or not h.ready.max_num_seqs or h.stats is None or h.stats.step_ms <= 0:
            return 0.0
        beyond = len(ledgers) + n - h.ready.max_num_seqs  # this request's place past the batch's slots
        if beyond <= 0:  # the common case, before looking at every running request
            return 0.0
        running = [led for led in ledgers.values() if not led.first]
        if not running:
            return 0.0
        use = 1.0 if self._typical_use is None else self._typical_use
        left = sorted(max(1, min(led.max_tokens, max(use * led.max_tokens, led.generated + 1)) - led.generated)
                      for led in running)
        rounds, k = divmod(beyond - 1, len(left))
        return (left[k] + rounds * left[-1]) * h.stats.step_ms / 1e3

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.time_ns() % 10**9}"

    async def _next(self, stream: RequestStream) -> P.Output | Delta:
        msg = await stream.get()
        if isinstance(msg, _WorkerLost):
            raise WorkerUnavailable(f"worker {msg.worker_id} stopped answering")
        if isinstance(msg, P.Failed):
            raise RequestFailed(msg.message, msg.status)
        if isinstance(msg, Exception):
            raise msg
        return msg

    def _named(self, entries: list[P.LogprobEntry | None]) -> list[P.LogprobEntry | None]:
        """Logprob entries with their token strings (workers send ids only); None (a prompt's first token) kept."""
        if self.tokenizer is None:
            return entries
        name = self.tokenizer.id_to_token
        return [e and P.LogprobEntry(e.token_id, name(e.token_id) or "", e.logprob,
                                     [(t, name(t) or "", v) for t, _, v in e.top]) for e in entries]

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       direct: Callable[[Delta], None] | None = None) -> AsyncIterator[Delta]:
        """Stream a request; if a worker dies under it, continue on another from the tokens already sent.

        A retry sends prompt + the tokens the client already has as the new prompt, with the
        remaining token budget, so the client sees one stream with nothing repeated or lost.

        With ``direct``, the deltas of steady decoding are not yielded: ``direct`` gets them, called from the
        router's reader as each worker step arrives (router/stream.py); it must not block. The rest (the first
        token, the last, anything a failover or hand-over takes part in) is yielded as usual, in order.
        """
        self.arrived.append(time.monotonic())
        if self._admitted:
            self._admitted.popleft()  # from here on this request counts through its stream
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop) if self.tokenizer is not None else None
        emitted: list[int] = []
        failures = 0

        def kept(delta: Delta) -> Delta:  # what the client has now, and counts of the whole request's prompt
            emitted.extend(delta.token_ids)
            delta.num_prompt_tokens = len(prompt)
            return delta

        while True:
            attempt_id = request_id if failures == 0 else f"{request_id}-retry{failures}"
            remaining = params.max_tokens - len(emitted)
            attempt_params = params if not emitted else replace(
                params, max_tokens=remaining, min_tokens=max(0, params.min_tokens - len(emitted)))
            attempt = self._attempt(attempt_id, prompt + emitted, attempt_params, detok,
                                    (lambda delta: direct(kept(delta))) if direct is not None else None)
            try:
                async for delta in attempt:
                    yield kept(delta)
                    if delta.finished:
                        return
                return
            except WorkerUnavailable as e:
                if isinstance(e, NoWorkerAvailable) and not emitted:
                    raise  # a new request: answer 503 now rather than hold the client
                failures += 1
                if failures > self.max_failovers or not await self.wait_for_decoder(self.failover_wait):
                    raise
                self.metrics.failovers.inc()
            finally:
                await attempt.aclose()  # its clean-up (aborts on the workers) now, not when collected

    async def _attempt(self, request_id: str, prompt: list[int], params: SamplingParams,
                       detok: IncrementalDetokenizer | None,
                       direct: Callable[[Delta], None] | None) -> AsyncIterator[Delta]:
        try:
            placement = self.policy.place(self.view(), prompt)
        except LookupError as e:
            raise NoWorkerAvailable(str(e)) from e
        decode = self.workers[placement.decode.worker_id]
        prefill = self.workers[placement.prefill.worker_id] if placement.prefill else None
        stream = RequestStream()
        self.streams[request_id] = stream
        holders: list[WorkerHandle] = []
        finished = False
        m = self.metrics
        source = decode if prefill is None else prefill
        self._waiting_on[request_id] = source
        source.view.inflight += 1
        m.running.inc()
        t0 = time.monotonic()
        # Load the policy and admission see: the prompt's KV on the decode worker (and on the prefill worker until
        # the hand-over), the uncached tokens queued on the worker that prefills until its first token.
        n_prompt, uncached = len(prompt), placement.uncached_tokens
        ledger = _Ledger(self, detok, t0, source.view, uncached, params.max_tokens)
        on_decoder = self._decoding.setdefault(decode.ready.worker_id, {})
        on_decoder[request_id] = ledger
        decode.view.active_tokens += n_prompt
        prefill_holds = prefill is not None
        if prefill_holds:
            prefill.view.active_tokens += n_prompt
        ledger.prefiller.queued_prefill_tokens += uncached
        ledger.prefiller.rates.started(t0)
        m.routed.labels(placement.reason).inc()
        m.predicted_hit_tokens.inc(placement.cached_tokens)
        self.decisions.append({
            "request_id": request_id, "decode": decode.ready.worker_id,
            "prefill": prefill.ready.worker_id if prefill else None, "reason": placement.reason,
            "prompt_tokens": n_prompt, "hit_tokens": placement.cached_tokens, "uncached_tokens": uncached,
            "costs": placement.costs})

        held: Delta | None = None  # this reader turn's steps, not yet written (see Router._hold)

        def write_held() -> None:
            nonlocal held
            delta, held = held, None
            if delta is not None:
                direct(delta)

        def lane(out):
            """A plain step of steady decoding, taken in the reader's turn (router/stream.py) and held until the
            turn ends, so that the steps a turn reads for this request go out as one event."""
            nonlocal held
            if type(out) is not P.Output or out.finished or out.prefilled or out.kv_bytes or out.kv_fallback:
                write_held()  # what came before goes first
                return out
            delta = ledger.take(out)
            if delta.finished:
                write_held()
                return delta  # a stop string ended it: the task ends the request
            if held is None:
                held = delta
                self._hold(stream, write_held)
            else:
                held.extend(delta)
            return None

        try:
            if prefill is None:
                m.prefills.labels("local").inc()
                holders.append(decode)
                await self.send(decode, P.Submit(request_id, prompt, params, "full"))
            else:
                m.prefills.labels("remote").inc()
                holders.append(prefill)
                await self.send(prefill, P.Submit(request_id, prompt, params, "prefill"))
            while True:
                item = await self._next(stream)
                out = item if isinstance(item, P.Output) else None  # else a Delta its lane made
                delta = ledger.take(out) if out is not None else item
                if out is not None and (out.kv_bytes or out.kv_fallback):
                    m.kv_bytes.inc(out.kv_bytes)
                    m.kv_seconds.observe(out.kv_seconds)
                    if out.kv_fallback:
                        m.kv_fallbacks.inc()
                        m.kv_failures.labels(out.kv_failure or "error").inc()
                if out is not None and out.prefilled and not delta.finished:
                    # Hand over to the decode worker; the prefill worker frees its blocks once they are read.
                    prefill.view.inflight -= 1
                    prefill.view.active_tokens -= n_prompt
                    prefill_holds = False
                    decode.view.inflight += 1
                    source = decode
                    self._waiting_on[request_id] = decode
                    holders.append(decode)
                    await self.send(decode, P.Submit(
                        request_id, prompt, params, "decode", first_token=out.new_token_ids[0],
                        kv_peer=prefill.ready.kv_peer, kv_block_ids=out.kv_block_ids,
                    ))
                if delta.finished:  # bookkeeping before the last yield: the consumer may stop there
                    finished = True
                    m.requests.labels(delta.finish_reason or "stop").inc()
                    done = time.monotonic()
                    m.e2e.observe(done - t0)
                    m.request_prompt.observe(n_prompt)
                    m.request_generation.observe(ledger.generated)
                    self.finished.append((done, n_prompt, ledger.cached, ledger.generated))
                    if ledger.generated > 1:
                        m.request_tpot.observe((ledger.last - ledger.first_at) / (ledger.generated - 1))
                yield delta
                if finished:
                    return
                if direct is not None:
                    stream.open_lane(lane)
        finally:
            held = None  # the client is gone or failed: nothing more for it from this attempt
            on_decoder.pop(request_id, None)
            if finished and not ledger.stopped:  # the share of max_tokens requests use (admission's guess)
                used = min(1.0, ledger.generated / max(1, ledger.max_tokens))
                self._typical_use = used if self._typical_use is None else 0.9 * self._typical_use + 0.1 * used
            self.streams.pop(request_id, None)
            self._waiting_on.pop(request_id, None)
            m.running.dec()
            decode.view.active_tokens -= n_prompt
            if prefill_holds:
                prefill.view.active_tokens -= n_prompt
            if ledger.first:
                ledger.prefiller.queued_prefill_tokens -= uncached
                ledger.prefiller.rates.cancelled(time.monotonic())
            source.view.inflight -= 1  # the one worker counting this request now
            stopped = ledger.stopped  # a stop string ended it here while its worker still runs it
            if stopped:
                self._stopped[request_id] = time.monotonic()
            if not finished or stopped:
                for h in holders:
                    if h.dead:
                        continue
                    try:
                        await self.send(h, P.Abort(request_id))
                    except zmq.ZMQError:
                        pass
