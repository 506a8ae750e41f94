"""A worker process: one engine, one role, commands in and outputs out over ZMQ.

    python -m tokenworks.worker.server --worker-id d0 --role decode \
        --commands tcp://127.0.0.1:PORT --events tcp://127.0.0.1:PORT --engine-args '{...}'

The main thread runs the engine loop: drain commands, apply KV releases
(prefill side) and finished pulls (decode side), step, publish outputs.
Pull threads (worker/pulls.py) do the decode side's KV pulls so that
decoding goes on while a prompt's KV arrives. A worker whose KV source or
pull threads break tells the router (``Unhealthy``) and exits, and the
launcher starts it again, as for a worker that died. A worker on a GPU runs
its warm-up (worker/warmup.py) before it reports ready.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import msgspec
import zmq

from tokenworks.codec import Codec
from tokenworks.config import EngineArgs
from tokenworks.outputs import Logprob, RequestOutput
from tokenworks.transfer.base import KVLayout, KVSource, host_id
from tokenworks.worker import protocol as P
from tokenworks.worker.pulls import PullJob, PullPool

STATS_INTERVAL = 0.25
SECRET_ENV = "TOKENWORKS_INTERNAL_SECRET"  # how the launcher hands the shared secret over (never on argv)


def _entry(lp: Logprob) -> P.LogprobEntry:
    """A logprob as the router receives it: ids only (token strings left empty; the router names them)."""
    return P.LogprobEntry(lp.token_id, "", lp.logprob, [(t, "", v) for t, _, v in lp.top])


class Worker:
    def __init__(self, ns: argparse.Namespace) -> None:
        from tokenworks.llm import build_engine

        self.worker_id = ns.worker_id
        self.role = ns.role
        self.cpus = sorted(os.sched_getaffinity(0))
        args = EngineArgs(**json.loads(ns.engine_args))
        self.loaded = build_engine(args, detokenize=False)  # the router turns tokens into text
        self.engine = self.loaded.engine
        self.engine.cumulative_outputs = False  # only each step's new tokens are sent
        self.scheduler = self.engine.scheduler
        self.scheduler.lease_seconds = ns.lease_seconds
        kv = self.loaded.runner.kv
        layout = KVLayout(
            model=self.loaded.model_name,
            dtype=kv.dtype_name,
            num_layers=self.loaded.model_config.num_layers,
            num_kv_heads=self.loaded.model_config.num_kv_heads,
            head_dim=self.loaded.model_config.head_dim,
            block_size=kv.block_size,
            block_nbytes=kv.block_nbytes,
        )
        self.source: KVSource | None = None
        self.transfers: PullPool | None = None
        secret = os.environ.get(SECRET_ENV, "").encode() or None
        if ns.kv_transport == "nixl":
            from tokenworks.transfer.nixl import NixlSink, NixlSource

            source_cls, sink = NixlSource, (lambda: NixlSink(self.worker_id, layout, kv.tensor))
        else:
            from tokenworks.transfer.tcp import TCPSink, TCPSource

            source_cls = lambda wid, lay, t: TCPSource(wid, lay, t, host=ns.internal_host, secret=secret)  # noqa: E731
            sink = lambda: TCPSink(layout, kv.tensor, secret=secret)  # noqa: E731
        on_gpu = kv.tensor.device.type == "cuda"
        self.warmup_seconds = 0.0
        if on_gpu:  # same-host GPU peers are read device to device (transfer/cuda_ipc.py); warm up first
            from tokenworks.transfer.cuda_ipc import CudaIpcSink, OpenedPools, export
            from tokenworks.worker.warmup import warm_up

            opened, network_sink = OpenedPools(), sink
            sink = lambda: CudaIpcSink(network_sink(), layout, kv.tensor, opened)  # noqa: E731
            _, self.warmup_seconds = warm_up(self.engine, kv.tensor, self.loaded.pool)
            if self.loaded.host_tier is not None:
                self.loaded.host_tier.clear()  # the warm-up's blocks
        self.kv_peer = None
        if self.role in ("prefill", "both"):
            self.source = source_cls(self.worker_id, layout, kv.tensor)
            self.kv_peer = msgspec.structs.replace(self.source.peer(), host=host_id(),
                                                   cuda_ipc=export(kv.tensor) if on_gpu else None)
        if self.role in ("decode", "both"):
            self.transfers = PullPool(sink, ns.kv_timeout, kv.block_nbytes)
        self.exit_code = 0
        # decode submits waiting for free blocks, with when they came (their pull counts from then: its time, and
        # whether a PeerGone for its source came after it)
        self.pending: list[tuple[P.Submit, float]] = []
        self.kv_stats: dict[str, tuple[int, float, str]] = {}  # request id -> bytes, seconds, failure cause
        self.ctx = zmq.Context.instance()
        self.commands = self.ctx.socket(zmq.PULL)
        self.commands.bind(ns.commands)  # PORT may be *: the system picks one, and Ready says which
        self.commands_endpoint = self.commands.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.events = self.ctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 1000)
        self.events.connect(ns.events)
        self.decoder = Codec(P.ToWorker, secret)
        self.encoder = Codec(P.FromWorker, secret)
        self.running = True
        self._last_stats = 0.0
        self._steps = self._steps_reported = 0
        self._step_time = self._step_time_reported = 0.0
        self.parent_pid = os.getppid()  # the router; if it dies, so do we
        tier = self.loaded.host_tier
        self.send(P.Ready(
            worker_id=self.worker_id, role=self.role, pid=os.getpid(), model=self.loaded.model_name,
            commands_endpoint=self.commands_endpoint, max_model_len=self.engine.max_model_len, block_size=kv.block_size, num_blocks=kv.num_blocks,
            kv_peer=self.kv_peer, cpus=self.cpus, load_seconds=self.loaded.load_seconds,
            warmup_seconds=self.warmup_seconds, graphs=self.loaded.graphs,
            cached_block_hashes=self.loaded.pool.record_events(),
            num_host_blocks=0 if tier is None else tier.num_blocks,
            host_block_hashes=[] if tier is None else tier.hashes(),
            max_num_seqs=self.scheduler.config.max_num_seqs, kv_dtype=kv.dtype_name,
        ))

    def send(self, msg: P.FromWorker) -> None:
        self.events.send(self.encoder.encode(msg))

    # -- commands ------------------------------------------------------------------------

    def handle(self, raw: bytes) -> None:
        try:
            msg = self.decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            print(f"[{self.worker_id}] refused a command: {e}", file=sys.stderr)
            return
        if isinstance(msg, P.Submit):
            self.submit(msg)
        elif isinstance(msg, P.Abort):
            self.pending = [p for p in self.pending if p[0].request_id != msg.request_id]
            self.engine.abort(msg.request_id)
        elif isinstance(msg, P.Release):
            self.scheduler.release_held(msg.request_id)
        elif isinstance(msg, P.PeerGone):
            if self.transfers is not None:
                self.transfers.peer_gone(msg.card)
        elif isinstance(msg, P.Shutdown):
            self.running = False

    def submit(self, msg: P.Submit) -> None:
        try:
            if msg.phase == "decode":
                if self.transfers is None or msg.kv_peer is None:
                    raise ValueError(f"worker {self.worker_id} ({self.role}) cannot take a decode phase")
                received = time.monotonic()
                if not self.try_reserve(msg, received):
                    self.pending.append((msg, received))
                return
            if msg.phase == "prefill" and self.source is None:
                raise ValueError(f"worker {self.worker_id} ({self.role}) cannot take a prefill phase")
            if msg.phase not in ("full", "prefill"):
                raise ValueError(f"unknown phase {msg.phase!r}")
            if msg.phase == "full" and self.role == "prefill":
                raise ValueError(f"worker {self.worker_id} is prefill-only")
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, prefill_only=msg.phase == "prefill")
        except ValueError as e:
            self.send(P.Failed(self.worker_id, msg.request_id, str(e), 400))

    def try_reserve(self, msg: P.Submit, received: float) -> bool:
        got = self.engine.reserve_transferred(msg.request_id, msg.prompt_token_ids, msg.first_token, msg.params)
        if got is None:
            return False
        request, first_block = got
        num_prompt_blocks = -(-len(msg.prompt_token_ids) // self.loaded.runner.kv.block_size)
        local = self.scheduler.kv.block_ids(request.request_id)[first_block:num_prompt_blocks]
        remote = msg.kv_block_ids[first_block:num_prompt_blocks]
        self.transfers.submit(PullJob(request, msg.kv_peer, remote, local, received))
        return True

    # -- loop ----------------------------------------------------------------------------

    def busy(self) -> bool:
        return self.engine.has_unfinished() or bool(self.pending) or self.scheduler.num_waiting_for_kv > 0 \
            or bool(self.scheduler.held)

    def output(self, out: RequestOutput) -> P.Output:
        kv_bytes, kv_seconds, failure = self.kv_stats.pop(out.request_id, (0, 0.0, ""))
        return P.Output(
            request_id=out.request_id, new_token_ids=out.new_token_ids, finished=out.finished,
            finish_reason=out.finish_reason, num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            logprobs=[_entry(l) for l in out.logprobs[-len(out.new_token_ids):]] if out.logprobs else [],
            prompt_logprobs=[l and _entry(l) for l in out.prompt_logprobs] if out.prompt_logprobs else [],
            prefilled=out.prefilled, kv_block_ids=out.kv_block_ids or [],
            kv_bytes=kv_bytes, kv_seconds=kv_seconds, kv_fallback=bool(failure), kv_failure=failure,
        )

    def stats(self) -> P.Stats:
        pool, tier = self.loaded.pool, self.loaded.host_tier
        s = self.scheduler
        busy = self.busy()
        n = self._steps - self._steps_reported
        step_ms = (self._step_time - self._step_time_reported) / n * 1e3 if n else 0.0
        self._steps_reported, self._step_time_reported = self._steps, self._step_time
        return P.Stats(
            worker_id=self.worker_id, num_running=len(s.running), num_waiting=len(s.waiting) + len(self.pending),
            num_waiting_for_kv=s.num_waiting_for_kv, num_held=len(s.held), blocks_used=pool.num_used_blocks,
            blocks_total=pool.num_usable_blocks, blocks_cached=pool.num_cached_idle_blocks,
            expired_leases=s.num_expired_leases, idle=not busy and pool.num_used_blocks == 0,
            steps=self._steps, step_ms=step_ms, busy_seconds=self._step_time,
            host_blocks_cached=0 if tier is None else len(tier),
            host_blocks_restored=0 if tier is None else tier.num_restored,
            draft_tokens=s.num_draft_tokens, accepted_draft_tokens=s.num_accepted_tokens,
        )

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        while self.running:
            timeout = 0 if self.engine.has_unfinished() else 20
            if poller.poll(timeout):
                while True:
                    try:
                        self.handle(self.commands.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.source is not None:
                for rid in self.source.poll_releases():
                    self.scheduler.release_held(rid)
                self.source.expect_pulls(bool(self.scheduler.held))
            if self.transfers is not None:
                self.finish_pulls()
            if self.engine.has_unfinished():
                t = time.perf_counter()
                outs = self.engine.step()
                self._step_time += time.perf_counter() - t
                self._steps += 1
                if self.source is not None:  # before the router hears of the prefill: its sink may pull at once
                    self.source.expect_pulls(bool(self.scheduler.held))
                if outs:
                    self.send(P.Outputs(self.worker_id, [self.output(o) for o in outs]))
            elif self.scheduler.held:
                self.scheduler.expire_leases()
            events = self.loaded.pool.drain_events()
            if events:
                self.send(P.KVEvents(self.worker_id, events))
            now = time.monotonic()
            if now - self._last_stats >= STATS_INTERVAL:
                self._last_stats = now
                self.send(self.stats())
                problem = self.problem()
                if problem:
                    print(f"[{self.worker_id}] unhealthy: {problem}; exiting to be restarted", file=sys.stderr)
                    self.send(P.Unhealthy(self.worker_id, problem))
                    self.exit_code = 3
                    self.running = False
                if os.getppid() != self.parent_pid:
                    print(f"[{self.worker_id}] the process that started it (the router, or its Ray actor) is gone; exiting",
                          file=sys.stderr)
                    self.running = False

    def problem(self) -> str | None:
        """Why this worker can no longer do its part of disaggregation (None: it can)."""
        for part in (self.source, self.transfers):
            problem = part.problem() if part is not None else None
            if problem:
                return problem
        return None

    def finish_pulls(self) -> None:
        for job in self.transfers.finished():
            rid = job.request.request_id
            if not job.ok:
                print(f"[{self.worker_id}] KV pull for {rid} failed ({job.error}); recomputing locally", file=sys.stderr)
            self.kv_stats[rid] = (job.nbytes, time.monotonic() - job.started, job.cause)
            self.scheduler.admit_transferred(job.request, job.ok)
        if self.pending:
            still = []
            for msg, received in self.pending:
                try:
                    if not self.try_reserve(msg, received):
                        still.append((msg, received))
                except ValueError as e:
                    self.send(P.Failed(self.worker_id, msg.request_id, str(e), 400))
            self.pending = still

    def close(self) -> None:
        if self.transfers is not None:
            self.transfers.close()
        if self.source is not None:
            self.source.close()
        self.commands.close(0)
        self.events.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A tokenworks worker process (started by `tokenworks serve`).")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
    ap.add_argument("--commands", required=True, help="ZMQ endpoint to bind for commands (tcp://HOST:* lets the system pick the port)")
    ap.add_argument("--events", required=True, help="the router's ZMQ endpoint for outputs")
    ap.add_argument("--engine-args", required=True, help="EngineArgs as JSON")
    ap.add_argument("--kv-transport", choices=["nixl", "tcp"], default="tcp")
    ap.add_argument("--internal-host", default="127.0.0.1", help="address the KV source binds (tcp transport)")
    ap.add_argument("--kv-timeout", type=float, default=10.0, help="seconds before a KV pull is abandoned")
    ap.add_argument("--lease-seconds", type=float, default=30.0, help="how long held prefill blocks wait")
    ap.add_argument("--cpus", default=None, help="comma-separated CPU ids to pin this worker to")
    ap.add_argument("--nice", type=int, default=0, help="lower this worker's CPU priority by this much (0-19)")
    ns = ap.parse_args(argv)
    if ns.nice:
        os.nice(ns.nice)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if ns.cpus:
        os.sched_setaffinity(0, {int(c) for c in ns.cpus.split(",")})
    worker = Worker(ns)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
