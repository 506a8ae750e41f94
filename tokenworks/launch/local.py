"""Local deployment: worker processes on this machine, each pinned to its own CPUs.

By default the machine's cores are split between the workers so that a
prefill worker never runs on a decode worker's cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from tokenworks.config import EngineArgs
from tokenworks.router.router import Router
from tokenworks.worker.server import SECRET_ENV


@dataclass
class WorkerSpec:
    worker_id: str
    role: str  # prefill, decode, both
    cpus: list[int] | None
    device: str = "cpu"


def plan_workers(prefill: int, decode: int, aggregated: int, cpus: list[int] | None = None,
                 cpu_sets: list[list[int]] | None = None, gpus: list[int] | None = None) -> list[WorkerSpec]:
    """Name the workers and give each its CPU set (contiguous shares of the machine's cores) or GPU."""
    roles = ["prefill"] * prefill + ["decode"] * decode + ["both"] * aggregated
    if not roles:
        raise ValueError("start at least one decode or aggregated worker")
    if decode + aggregated == 0:
        raise ValueError("prefill workers need a decode (or aggregated) worker to hand requests to")
    counters = {"prefill": 0, "decode": 0, "both": 0}
    prefix = {"prefill": "prefill", "decode": "decode", "both": "agg"}
    names = []
    for r in roles:
        names.append(f"{prefix[r]}-{counters[r]}")
        counters[r] += 1
    if cpu_sets is not None:
        if len(cpu_sets) != len(roles):
            raise ValueError(f"{len(cpu_sets)} CPU sets given for {len(roles)} workers")
        sets: list[list[int] | None] = list(cpu_sets)
    else:
        cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        if len(cpus) >= len(roles):
            share, extra = divmod(len(cpus), len(roles))
            sets, i = [], 0
            for k in range(len(roles)):
                n = share + (1 if k < extra else 0)
                sets.append(cpus[i : i + n])
                i += n
        else:  # more workers than cores: share them round-robin
            sets = [[cpus[k % len(cpus)]] for k in range(len(roles))]
    specs = []
    for k, (name, role) in enumerate(zip(names, roles)):
        device = f"cuda:{gpus[k % len(gpus)]}" if gpus else "cpu"
        specs.append(WorkerSpec(name, role, None if gpus else sets[k], device))
    return specs


class LocalCluster:
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
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, WorkerSpec] = {}
        self.stopping = False
        self.restarts: dict[str, int] = {}

    def spawn(self, spec: WorkerSpec) -> None:
        endpoint = f"tcp://{self.internal_host}:*"  # the worker binds a port the system picks; Ready says which
        self.router.expect(spec.worker_id)
        args = asdict(self.prefill_args if spec.role == "prefill" else self.engine_args)
        args["device"] = spec.device
        args["num_threads"] = len(spec.cpus) if spec.cpus else args.get("num_threads")
        cmd = [sys.executable, "-m", "tokenworks.worker.server", "--worker-id", spec.worker_id, "--role", spec.role,
               "--commands", endpoint, "--events", self.router.events_endpoint, "--engine-args", json.dumps(args),
               "--kv-transport", self.kv_transport, "--kv-timeout", str(self.kv_timeout),
               "--lease-seconds", str(self.lease_seconds), "--internal-host", self.internal_host]
        if spec.cpus:
            cmd += ["--cpus", ",".join(map(str, spec.cpus))]
        if spec.role == "prefill" and self.prefill_nice:
            cmd += ["--nice", str(self.prefill_nice)]
        self.specs[spec.worker_id] = spec
        env = dict(os.environ)
        env.pop(SECRET_ENV, None)
        if self.secret:
            env[SECRET_ENV] = self.secret.decode()  # the environment, not argv: argv is visible to every user
        self.procs[spec.worker_id] = subprocess.Popen(cmd, start_new_session=True, env=env)

    async def start(self, specs: list[WorkerSpec], timeout: float = 120.0, progress=None) -> None:
        for spec in specs:
            self.spawn(spec)
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in self.procs if w in self.router.workers]
            if progress is not None:
                progress(len(ready), len(self.procs))
            if len(ready) == len(self.procs):
                return
            for wid, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"worker {wid} exited with code {p.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def supervise(self, restart: bool = True, interval: float = 0.1, backoff: float = 1.0) -> None:
        """Watch the workers: one that exits is marked dead at once, then started again."""
        while not self.stopping:
            for wid, p in list(self.procs.items()):
                if p.poll() is None or self.stopping:
                    continue
                self.router.mark_dead(wid)
                if not restart:
                    continue
                n = self.restarts.get(wid, 0) + 1
                self.restarts[wid] = n
                print(f"[tokenworks] worker {wid} exited with code {p.returncode}; restarting (restart {n})",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(min(backoff * n, 10.0))
                if not self.stopping:
                    self.spawn(self.specs[wid])
            await asyncio.sleep(interval)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the workers this cluster started: SIGTERM by pid, then SIGKILL after ``grace``."""
        self.stopping = True
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
