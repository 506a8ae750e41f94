"""Local deployment: worker processes on this machine, each pinned to its own CPUs.

By default the machine's cores are split between the workers so that a
prefill worker never runs on a decode worker's cores.
"""

from __future__ import annotations

import os
import subprocess

from tokenworks.launch.launcher import Launcher, WorkerSpec, next_worker_id, process_env, stop_processes


def plan_workers(prefill: int, decode: int, aggregated: int, cpus: list[int] | None = None,
                 cpu_sets: list[list[int]] | None = None, gpus: list[int] | None = None) -> list[WorkerSpec]:
    """Name the workers and give each its CPU set (contiguous shares of the machine's cores) or GPU."""
    roles = ["prefill"] * prefill + ["decode"] * decode + ["both"] * aggregated
    if not roles:
        raise ValueError("start at least one decode or aggregated worker")
    if decode + aggregated == 0:
        raise ValueError("prefill workers need a decode (or aggregated) worker to hand requests to")
    names: list[str] = []
    for r in roles:
        names.append(next_worker_id(r, names))
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


class LocalCluster(Launcher):
    """Workers as child processes of the router, each pinned to its CPU set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, spec: WorkerSpec) -> None:
        self.procs[spec.worker_id] = subprocess.Popen(self.worker_command(spec, self.internal_host),
                                                      start_new_session=True, env=process_env(self.worker_env()))

    def _ended(self, worker_id: str) -> str | None:
        p = self.procs.get(worker_id)
        if p is None or p.poll() is None:
            return None
        return f"exited with code {p.returncode}"

    def where(self, worker_id: str) -> str:
        spec = self.specs.get(worker_id)
        if spec is None:
            return ""
        if spec.device != "cpu":
            return f"this machine, {spec.device}"
        return f"this machine, CPUs {','.join(map(str, spec.cpus))}" if spec.cpus else "this machine"

    def _forget(self, worker_id: str) -> None:
        self.procs.pop(worker_id, None)

    def _terminate(self, worker_ids: list[str], grace: float) -> None:
        stop_processes([self.procs.pop(w) for w in worker_ids if w in self.procs], grace)
