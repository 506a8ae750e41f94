"""Workers on a Ray cluster (`tokenworks serve --ray [ADDRESS]`).

Each worker is the same process as with the local launcher (`python -m tokenworks.worker.server`), started on
the node Ray picks by a small actor, ``WorkerHost``, that holds the worker's resources (CPUs, GPUs, custom
resources such as a node label: `--prefill-resources`, `--decode-resources`), watches the process and stops it.
The worker binds its sockets on its node's address and reports them in its ``Ready``; the router, the API and
the worker protocol are those of a local deployment. A worker whose process exits, or whose actor or node is
lost, is marked dead at the next look (every 0.1 s) and started again wherever Ray finds the resources; the
router moves its requests to other workers from the tokens already sent.

Nodes on other machines reach the router at ``--internal-host``, which must then be an address of this machine
that they can route to, with ``--internal-secret`` (every internal message signed) and ``--kv-transport tcp``.
"""

from __future__ import annotations

import socket
import subprocess
import time

from tokenworks.launch.launcher import Launcher, WorkerSpec, process_env, stop_processes

NODE_ADDRESS = "{node_address}"  # in a worker's command line: replaced by its node's address on the node


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that answers a TCP connection (Ray's own connect waits and retries for a minute or more)."""
    host, sep, port = address.rpartition(":")
    if address == "auto":  # RAY_ADDRESS or a cluster started on this machine: Ray finds it
        return
    if not sep or not port.isdigit():
        raise ValueError(f"--ray {address!r}: give the head node's HOST:PORT (the GCS address `ray start --head` "
                         "printed), or no address to start a cluster on this machine")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def parse_resources(text: str | None, flag: str) -> dict[str, float]:
    """'CPU=2,GPU=1,prefill_node=1' -> {'CPU': 2.0, 'GPU': 1.0, 'prefill_node': 1.0}."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        try:
            amount = float(value) if eq else 1.0
        except ValueError:
            amount = -1.0
        if not name.strip() or amount < 0:
            raise ValueError(f"{flag}: {part!r} is not NAME=AMOUNT (e.g. CPU=2,GPU=1,decode_node=1)")
        out[name.strip()] = amount
    return out


class WorkerHost:
    """Lives on a Ray node: starts one worker process there, reports whether it runs, stops it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: list[str], env: dict[str, str]) -> dict:
        import ray

        address = ray.util.get_node_ip_address()
        cmd = [c.replace(NODE_ADDRESS, address) for c in cmd]
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=process_env(env))
        return {"pid": self.proc.pid, "node_id": ray.get_runtime_context().get_node_id(), "address": address}

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float) -> None:
        if self.proc is not None:
            stop_processes([self.proc], grace)


class _Placed:
    """One worker's actor and the calls in flight to it."""

    def __init__(self, actor, started) -> None:
        self.actor, self.started, self.poll = actor, started, None
        self.info: dict | None = None


class RayCluster(Launcher):
    def __init__(self, *args, address: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            import ray
        except ImportError:
            raise ValueError("--ray needs Ray installed where tokenworks runs: pip install 'tokenworks[ray]' "
                             "(or pip install ray)") from None

        self.ray = ray
        self.placed: dict[str, _Placed] = {}
        self.started_cluster = False
        if address:
            check_reachable(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
            else:  # a cluster of this machine alone, stopped with the server
                ray.init(log_to_driver=False, logging_level="WARNING", include_dashboard=False)
                self.started_cluster = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot reach the Ray cluster at {address or 'a new local cluster'}: {first}") from None
        self.host_cls = ray.remote(max_restarts=0, max_concurrency=2)(WorkerHost)
        self.here = ray.util.get_node_ip_address()

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return f"Ray cluster of {len(nodes)} node(s)" + (" (started here)" if self.started_cluster else "")

    @staticmethod
    def _resources(spec: WorkerSpec) -> dict[str, float]:
        """What the worker reserves: its role's, else one GPU (CUDA) or one CPU."""
        return dict(spec.resources) or ({"GPU": 1.0} if spec.device.startswith("cuda") else {"CPU": 1.0})

    def _options(self, spec: WorkerSpec) -> dict:
        res = self._resources(spec)
        opts = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0)}
        if res:
            opts["resources"] = res
        return opts

    def _spawn(self, spec: WorkerSpec) -> None:
        loopback = self.internal_host in ("127.0.0.1", "localhost", "::1")
        host = self.internal_host if loopback else NODE_ADDRESS
        cuda = spec.device.startswith("cuda")
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: the worker uses the first visible one.
        spec = WorkerSpec(spec.worker_id, spec.role, None, "cuda:0" if cuda else "cpu", spec.resources, spec.engine)
        opts = self._options(spec)
        if not cuda and opts["num_cpus"] >= 1:
            spec.engine = {**spec.engine, "num_threads": spec.engine.get("num_threads") or int(opts["num_cpus"])}
        actor = self.host_cls.options(**opts).remote()
        self.placed[spec.worker_id] = _Placed(actor, actor.start.remote(self.worker_command(spec, host),
                                                                          self.worker_env()))

    def _ended(self, worker_id: str) -> str | None:
        ray = self.ray
        p = self.placed.get(worker_id)
        if p is None:
            return None
        try:
            if p.info is None:
                done, _ = ray.wait([p.started], timeout=0)
                if not done:
                    return None  # not placed yet (or the process is starting)
                p.info = ray.get(p.started)
                if self.internal_host in ("127.0.0.1", "localhost", "::1") and p.info["address"] != self.here:
                    return (f"was placed on node {p.info['address']}, another machine, which cannot reach this router "
                            "on the loopback: serve with --internal-host (an address of this machine) and "
                            "--internal-secret")
            if p.poll is None:
                p.poll = p.actor.poll.remote()
            done, _ = ray.wait([p.poll], timeout=0)
            if not done:
                return None
            code, p.poll = ray.get(p.poll), None
        except ray.exceptions.RayError as e:
            return f"lost its Ray actor ({type(e).__name__}: its node may have left the cluster)"
        return None if code is None else f"exited with code {code} on node {p.info['address']}"

    def _forget(self, worker_id: str) -> None:
        p = self.placed.pop(worker_id, None)
        if p is not None:
            self.ray.kill(p.actor, no_restart=True)

    def where(self, worker_id: str) -> str:
        p = self.placed.get(worker_id)
        if p is None:
            return ""
        if p.info is None:
            try:
                p.info = self.ray.get(p.started, timeout=5)
            except Exception:  # noqa: BLE001 - only a description
                return "Ray node unknown"
        return f"Ray node {p.info['node_id'][:12]} ({p.info['address']})"

    def waiting_for(self, worker_id: str) -> str:
        p = self.placed.get(worker_id)
        if p is not None and p.info is None and not self.ray.wait([p.started], timeout=0)[0]:
            want = ", ".join(f"{k}={v:g}" for k, v in self._resources(self.specs[worker_id]).items())
            return f"no Ray node has given it {want} yet (are they all taken, or offered by no node?)"
        return super().waiting_for(worker_id)

    def node_of(self, worker_id: str) -> str | None:
        p = self.placed.get(worker_id)
        return None if p is None or p.info is None else p.info["node_id"]

    def _terminate(self, worker_ids: list[str], grace: float) -> None:
        ray = self.ray
        placed = [self.placed.pop(w) for w in worker_ids if w in self.placed]
        refs = [p.actor.stop.remote(grace) for p in placed]
        deadline = time.monotonic() + grace + 2.0
        for ref in refs:
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - the actor is killed below either way
                pass
        for p in placed:
            ray.kill(p.actor, no_restart=True)

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        if self.ray.is_initialized():
            self.ray.shutdown()  # a cluster started here stops with it
