"""KV transfer over NIXL (UCX): the decode side READs registered memory, a notification releases.

Each worker registers its whole KV pool once. A sink adds a source's agent
from the metadata on its ``KVPeer`` card; a card with new metadata (the
source restarted) replaces the old agent, so stale addresses are never used.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import torch

from tokenworks.transfer.base import KVLayout, KVPeer, KVPeerGone, KVSink, KVSource, KVTransferError, check_layout

_RELEASE = b"release:"


def _agent(name: str, kv_tensor: torch.Tensor, progress_thread: bool):
    # NIXL logs each agent it makes at INFO on stdout (a worker makes several): warnings only, unless the user set
    # NIXL_LOG_LEVEL
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("the nixl package is not installed; use --kv-transport tcp") from e
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))
    device = kv_tensor.device
    mem = "VRAM" if device.type == "cuda" else "DRAM"
    dev_id = device.index or 0 if device.type == "cuda" else 0
    agent.register_memory([(kv_tensor.data_ptr(), kv_tensor.numel() * kv_tensor.element_size(), dev_id, "")], mem)
    return agent, mem, dev_id


def _unreachable() -> tuple[type[BaseException], ...]:
    """NIXL's errors for a source that is gone: its process ended after an earlier transfer (remote disconnect), or
    no UCX endpoint to it can be made (backend error while its metadata is loaded). Measured with the source
    SIGKILLed: both within 10 ms of the pull (docs/faults.md)."""
    try:
        from nixl._bindings import nixlBackendError, nixlRemoteDisconnectError
    except ImportError:  # pragma: no cover - a nixl without these names: such failures count as "error"
        return ()
    return nixlRemoteDisconnectError, nixlBackendError


class NixlSource(KVSource):
    """Prefill side. One thread owns the agent: it polls notifications every ``poll_interval``
    seconds, which also moves UCX along (connection wire-up) while the engine computes.
    NIXL's own progress thread busy-polls a whole core, too much beside a CPU engine. While the
    worker holds no blocks for sinks to read (``expect_pulls(False)``: an aggregated worker serving
    alone, a prefill worker between requests) it polls every ``idle_poll_interval`` instead: a
    poll every 2 ms cost a CPU engine's decode step 3 % (6.89 -> 7.09 ms, docs/serving.md)."""

    def __init__(self, worker_id: str, layout: KVLayout, kv_tensor: torch.Tensor, poll_interval: float = 0.002,
                 idle_poll_interval: float = 0.05) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.layout = layout
        self.name = f"tokenworks-{worker_id}-{time.time_ns()}"
        self.base = kv_tensor.data_ptr()
        self.poll_interval, self.idle_poll_interval = poll_interval, idle_poll_interval
        self._expecting = threading.Event()
        self._expecting.set()  # until the worker says otherwise
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(kv_tensor,), name="kv-nixl-source", daemon=True)
        self._thread.start()
        result = self._ready.get()
        if isinstance(result, BaseException):
            raise result
        self.metadata = result

    def _run(self, kv_tensor: torch.Tensor) -> None:
        try:
            agent, _, _ = _agent(self.name, kv_tensor, progress_thread=False)
            self._ready.put(agent.get_agent_metadata())
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self._ready.put(e)
            return
        while not self._stop.is_set():
            for messages in agent.get_new_notifs().values():
                for m in messages:
                    if m.startswith(_RELEASE):
                        self._releases.put(m[len(_RELEASE):].decode())
            if self._expecting.is_set():
                time.sleep(self.poll_interval)
            else:
                self._expecting.wait(self.idle_poll_interval)  # back to fast polls as soon as blocks are held

    def expect_pulls(self, expecting: bool) -> None:
        if expecting != self._expecting.is_set():
            (self._expecting.set if expecting else self._expecting.clear)()

    @property
    def polling_fast(self) -> bool:
        return self._expecting.is_set()

    def peer(self) -> KVPeer:
        return KVPeer(transport="nixl", worker_id=self.worker_id, layout=self.layout, agent_name=self.name,
                      agent_metadata=self.metadata, base_address=self.base)

    def close(self) -> None:
        self._stop.set()
        self._expecting.set()  # ends an idle wait now
        self._thread.join(timeout=2)


class NixlSink(KVSink):
    """Decode side; used from one thread."""

    def __init__(self, worker_id: str, layout: KVLayout, kv_tensor: torch.Tensor) -> None:
        self.layout = layout
        # The sink drives its own transfers by polling them; no extra thread.
        self.agent, self.mem, self.dev_id = _agent(f"tokenworks-{worker_id}-{time.time_ns()}", kv_tensor, False)
        self.base = kv_tensor.data_ptr()
        self._peers: dict[str, bytes] = {}  # agent name -> metadata it was added with
        self._gone = _unreachable()

    def _connect(self, peer: KVPeer) -> str:
        known = self._peers.get(peer.agent_name)
        if known != peer.agent_metadata:
            if known is not None:
                self.agent.remove_remote_agent(peer.agent_name)
            self.agent.add_remote_agent(peer.agent_metadata)
            self._peers[peer.agent_name] = peer.agent_metadata
        return peer.agent_name

    def pull(self, peer: KVPeer, request_id: str, remote_block_ids: list[int], local_block_ids: list[int],
             timeout: float, gone: Callable[[], bool] = lambda: False) -> int:
        check_layout(self.layout, peer.layout)
        if not remote_block_ids:
            return 0
        try:
            self._read(peer, remote_block_ids, local_block_ids, timeout, gone)
        except self._gone as e:
            raise KVPeerGone(f"KV source {peer.worker_id} is gone ({type(e).__name__}: {e})") from e
        return self.layout.block_nbytes * len(remote_block_ids)

    def _read(self, peer: KVPeer, remote_block_ids: list[int], local_block_ids: list[int], timeout: float,
              gone: Callable[[], bool]) -> None:
        name = self._connect(peer)
        n = self.layout.block_nbytes
        local = self.agent.get_xfer_descs([(self.base + b * n, n, self.dev_id) for b in local_block_ids], self.mem)
        remote = self.agent.get_xfer_descs([(peer.base_address + b * n, n, 0) for b in remote_block_ids], self.mem)
        handle = self.agent.initialize_xfer("READ", local, remote, name)
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout
            while state != "DONE":
                if state == "ERR":
                    raise KVTransferError(f"NIXL read from {peer.worker_id} failed")
                if time.monotonic() > deadline:
                    raise KVTransferError(f"NIXL read from {peer.worker_id} timed out after {timeout:.1f}s")
                if gone():
                    raise KVPeerGone(f"KV source {peer.worker_id} is gone (declared dead by the router)")
                state = self.agent.check_xfer_state(handle)
        finally:
            self.agent.release_xfer_handle(handle)

    def release(self, peer: KVPeer, request_id: str) -> None:
        self.agent.send_notif(self._connect(peer), _RELEASE + request_id.encode())
