"""A NIXL source in a process of its own, SIGKILLed, and a pull from it; run by tests/test_transfer.py in a child
process, because NIXL may crash its process at exit once a peer has died (docs/faults.md).

    python tests/nixl_dead_source.py sink [--pull-first]   # prints one JSON line: how the pull after the kill failed
    python tests/nixl_dead_source.py sink --stop           # SIGSTOP instead; the pull is declared gone after 0.5 s
    python tests/nixl_dead_source.py source PATH           # (started by the above) writes its card to PATH
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import msgspec
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.test_transfer import SHAPE, layout  # noqa: E402
from tokenworks.transfer.base import KVPeer  # noqa: E402


def source(path: str) -> None:
    from tokenworks.transfer.nixl import NixlSource

    card = NixlSource("p0", layout(), torch.randn(SHAPE)).peer()
    with open(path + ".tmp", "wb") as f:
        f.write(msgspec.msgpack.encode(card))
    os.rename(path + ".tmp", path)  # whole or not at all
    time.sleep(120)


def sink(pull_first: bool, stop: bool = False) -> None:
    from tokenworks.transfer.nixl import NixlSink

    folder = tempfile.TemporaryDirectory()
    path = os.path.join(folder.name, "card")
    proc = subprocess.Popen([sys.executable, __file__, "source", path], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the source did not start")
            time.sleep(0.05)
        with open(path, "rb") as f:
            peer = msgspec.msgpack.decode(f.read(), type=KVPeer)
        end = NixlSink("d0", layout(), torch.zeros(SHAPE))
        if pull_first:
            end.pull(peer, "before", [1, 2], [3, 4], timeout=30)
    finally:
        if stop:
            proc.send_signal(signal.SIGSTOP)  # hung, not dead: only the router's notice ends the pull early
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        folder.cleanup()
    t0 = time.monotonic()
    try:
        end.pull(peer, "after", [1, 2], [3, 4], timeout=30, gone=lambda: stop and time.monotonic() - t0 > 0.5)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - reported
        result = {"error": type(e).__name__, "cause": getattr(e, "cause", None), "message": str(e)}
    result["seconds"] = time.monotonic() - t0
    if stop:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip NIXL's teardown (see above)


if __name__ == "__main__":
    if sys.argv[1] == "source":
        source(sys.argv[2])
    else:
        sink("--pull-first" in sys.argv, "--stop" in sys.argv)
