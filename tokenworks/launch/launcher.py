"""What every launcher does, whatever starts the processes: start a deployment's workers and wait for them,
watch them (one that exits is marked dead at once and started again), add and drain workers while the server
runs, and stop them all.

A backend says how one worker is started, how its end is seen and how it is stopped: ``local.py`` (child
processes of the router on this machine) and ``ray.py`` (processes placed on a Ray cluster's nodes). The router,
the API and the worker protocol are the same for both: a worker reports its endpoints in its ``Ready``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from tokenworks.config import EngineArgs
from tokenworks.router.router import Router
from tokenworks.worker.server import SECRET_ENV

ROLES = ("prefill", "decode", "both")
NAME_PREFIX = {"prefill": "prefill", "decode": "decode", "both": "agg"}


class WorkersNotReady(RuntimeError):
    """Workers that exited while starting, or were not ready in time (the message says which and why)."""


@dataclass
class WorkerSpec:
    worker_id: str
    role: str  # prefill, decode, both
    cpus: list[int] | None
    device: str = "cpu"
    resources: dict[str, float] = field(default_factory=dict)  # what a cluster scheduler must reserve for it
    engine: dict = field(default_factory=dict)  # EngineArgs fields that differ from the launcher's for this worker


def process_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment a worker process starts with: this one's, with the internal secret only as ``extra``
    gives it (see ``Launcher.worker_env``)."""
    env = dict(os.environ)
    env.pop(SECRET_ENV, None)
    env.update(extra)
    return env


def stop_processes(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to each process still running, then SIGKILL to those not gone within ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def next_worker_id(role: str, taken) -> str:
    """The first free name of a role: prefill-N, decode-N, agg-N."""
    k = 0
    while f"{NAME_PREFIX[role]}-{k}" in taken:
        k += 1
    return f"{NAME_PREFIX[role]}-{k}"


class Launcher:
    def __init__(self, router: Router, engine_args: EngineArgs, kv_transport: str, kv_timeout: float = 10.0,
                 lease_seconds: float = 30.0, prefill_nice: int = 0, internal_host: str = "127.0.0.1",
                 secret: bytes | None = None, prefill_args: EngineArgs | None = None) -> None:
        self.router = router
        self.engine_args = engine_args
        self.prefill_args = prefill_args or engine_args  # prefill-only workers (a larger step budget, say)
        self.kv_transport = kv_transport
        self.kv_timeout = kv_timeout
        self.lease_seconds = lease_seconds
        self.prefill_nice = prefill_nice
        self.internal_host = internal_host
        self.secret = secret
        self.specs: dict[str, WorkerSpec] = {}
        self.stopping = False
        self.restarts: dict[str, int] = {}
        self.draining: set[str] = set()

    # -- what a backend provides ----------------------------------------------------------------------------
    def _spawn(self, spec: WorkerSpec) -> None:
        raise NotImplementedError

    def _ended(self, worker_id: str) -> str | None:
        """None while the worker's process runs; else how it ended, in words."""
        raise NotImplementedError

    def _terminate(self, worker_ids: list[str], grace: float) -> None:
        """Stop these workers' processes: SIGTERM, then SIGKILL after ``grace`` seconds."""
        raise NotImplementedError

    def where(self, worker_id: str) -> str:
        """Where the worker runs, for the start-up lines."""
        return ""

    def waiting_for(self, worker_id: str) -> str:
        """What a worker that is not ready yet waits for, in words."""
        return "its process runs but has not reported ready (loading the model?)"

    def node_of(self, worker_id: str) -> str | None:
        """The cluster node the worker runs on (None: this machine, or not placed yet)."""
        return None

    # -- shared ---------------------------------------------------------------------------------------------
    def worker_command(self, spec: WorkerSpec, host: str) -> list[str]:
        """The worker's command line; ``host`` is the address it binds its own sockets to."""
        args = asdict(self.prefill_args if spec.role == "prefill" else self.engine_args)
        args.update(spec.engine)
        args["device"] = spec.device
        args["num_threads"] = len(spec.cpus) if spec.cpus else args.get("num_threads")
        cmd = [sys.executable, "-m", "tokenworks.worker.server", "--worker-id", spec.worker_id, "--role", spec.role,
               "--commands", f"tcp://{host}:*",  # the worker binds a port the system picks; Ready says which
               "--events", self.router.events_endpoint, "--engine-args", json.dumps(args),
               "--kv-transport", self.kv_transport, "--kv-timeout", str(self.kv_timeout),
               "--lease-seconds", str(self.lease_seconds), "--internal-host", host]
        if spec.cpus:
            cmd += ["--cpus", ",".join(map(str, spec.cpus))]
        if spec.role == "prefill" and self.prefill_nice:
            cmd += ["--nice", str(self.prefill_nice)]
        return cmd

    def worker_env(self) -> dict[str, str]:
        """Variables the worker needs beyond its node's environment (the internal plane's secret: the
        environment, not argv, which every user can read)."""
        return {SECRET_ENV: self.secret.decode()} if self.secret else {}

    def spawn(self, spec: WorkerSpec) -> None:
        self.router.expect(spec.worker_id)
        self.specs[spec.worker_id] = spec
        self._spawn(spec)

    async def wait_ready(self, worker_ids: list[str], timeout: float, progress=None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in worker_ids if w in self.router.workers and not self.router.workers[w].dead]
            if progress is not None:
                progress(len(ready), len(worker_ids))
            if len(ready) == len(worker_ids):
                return
            for wid in worker_ids:
                ended = self._ended(wid)
                if ended is not None:
                    raise WorkersNotReady(f"worker {wid} {ended} while starting")
            if time.monotonic() > deadline:
                missing = "; ".join(f"{w}: {self.waiting_for(w)}" for w in worker_ids if w not in ready)
                raise WorkersNotReady(f"workers not ready after {timeout:.0f}s: {missing}")
            await asyncio.sleep(0.1)

    async def start(self, specs: list[WorkerSpec], timeout: float = 120.0, progress=None) -> None:
        for spec in specs:
            self.spawn(spec)
        await self.wait_ready([s.worker_id for s in specs], timeout, progress)

    async def supervise(self, restart: bool = True, interval: float = 0.1, backoff: float = 1.0) -> None:
        """Watch the workers: one that ends is marked dead at once, then started again."""
        while not self.stopping:
            for wid in list(self.specs):
                if self.stopping or wid in self.draining:
                    continue
                ended = self._ended(wid)
                if ended is None:
                    continue
                self.router.mark_dead(wid)
                if not restart:
                    continue
                n = self.restarts.get(wid, 0) + 1
                self.restarts[wid] = n
                print(f"[tokenworks] worker {wid} {ended}; restarting (restart {n})", file=sys.stderr, flush=True)
                self._forget(wid)
                await asyncio.sleep(min(backoff * n, 10.0))
                if not self.stopping and wid in self.specs:
                    self.spawn(self.specs[wid])
            await asyncio.sleep(interval)

    def _forget(self, worker_id: str) -> None:
        """Drop the backend's record of an ended worker's process (before it is started again)."""

    # -- scaling a running fleet ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {r: 0 for r in ROLES}
        for wid, spec in self.specs.items():
            if wid not in self.draining:
                out[spec.role] += 1
        return out

    def new_spec(self, role: str) -> WorkerSpec:
        """A worker like the others of its role (the first one's device, resources and engine flags)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        like = next((s for s in self.specs.values() if s.role == role), None)
        taken = set(self.specs) | set(self.router.workers)
        if like is None:
            return WorkerSpec(next_worker_id(role, taken), role, None, self.engine_args.device)
        return WorkerSpec(next_worker_id(role, taken), role, None, like.device, dict(like.resources), dict(like.engine))

    async def add(self, role: str, timeout: float = 300.0) -> str:
        """Start one more worker of a role and wait until the router routes to it."""
        spec = self.new_spec(role)
        self.spawn(spec)
        try:
            await self.wait_ready([spec.worker_id], timeout)
        except BaseException:
            self.router.remove(spec.worker_id)
            self.specs.pop(spec.worker_id, None)
            self._terminate([spec.worker_id], 2.0)
            raise
        return spec.worker_id

    async def drain(self, worker_id: str, timeout: float = 600.0) -> None:
        """Take a worker out: no new request goes to it, the ones it holds finish, then it stops."""
        if worker_id not in self.specs:
            raise KeyError(worker_id)
        spec = self.specs[worker_id]
        others = [s for w, s in self.specs.items() if w != worker_id and w not in self.draining]
        if spec.role in ("decode", "both") and not any(s.role in ("decode", "both") for s in others):
            raise ValueError(f"{worker_id} is the last decode-capable worker; add another before removing it")
        self.draining.add(worker_id)
        self.router.drain(worker_id)
        deadline = time.monotonic() + timeout
        while not self.router.drained(worker_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.specs.pop(worker_id, None)
        self.router.remove(worker_id)
        self._terminate([worker_id], 5.0)
        self.draining.discard(worker_id)

    def undrain(self, worker_id: str) -> None:
        """Call a drain off (its ``drain`` call cancelled first): the worker takes new requests again."""
        if worker_id in self.draining and worker_id in self.specs:
            self.draining.discard(worker_id)
            self.router.undrain(worker_id)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every worker this launcher started."""
        self.stopping = True
        self._terminate(list(self.specs), grace)
