"""KV transports moving real blocks between two pools; layout checks."""

import contextlib
import time

import pytest
import torch

from tokenworks.transfer.base import KVLayout, KVLayoutMismatch, KVPeer, KVTransferError, check_layout

SHAPE = (12, 2, 2, 4, 2, 8)  # blocks, layers, k/v, block_size, kv heads, head_dim


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout(**over):
    base = dict(model="m", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
                block_nbytes=2 * 2 * 4 * 2 * 8 * 4)
    base.update(over)
    return KVLayout(**base)


def transports():
    out = ["tcp"]
    try:
        import nixl  # noqa: F401

        out.append("nixl")
    except ImportError:
        pass
    return out


def make_pair(kind, src_tensor, dst_tensor, src_layout, dst_layout):
    if kind == "tcp":
        from tokenworks.transfer.tcp import TCPSink, TCPSource

        return TCPSource("p0", src_layout, src_tensor), TCPSink(dst_layout, dst_tensor)
    from tokenworks.transfer.nixl import NixlSink, NixlSource

    return NixlSource("p0", src_layout, src_tensor), NixlSink("d0", dst_layout, dst_tensor)


def poll_releases(source, timeout=5.0):
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline and not got:
        got = source.poll_releases()
        time.sleep(0.01)
    return got


@pytest.mark.parametrize("kind", transports())
def test_pull_copies_exact_blocks_and_release_arrives(kind):
    src = torch.randn(SHAPE)
    dst = torch.zeros(SHAPE)
    source, sink = make_pair(kind, src, dst, layout(), layout())
    try:
        moved = sink.pull(source.peer(), "req-1", [3, 7, 1], [5, 2, 9], timeout=10)
        assert moved == 3 * layout().block_nbytes
        assert torch.equal(dst[5], src[3]) and torch.equal(dst[2], src[7]) and torch.equal(dst[9], src[1])
        untouched = [b for b in range(SHAPE[0]) if b not in (5, 2, 9)]
        assert dst[untouched].abs().sum() == 0
        sink.release(source.peer(), "req-1")
        assert poll_releases(source) == ["req-1"]
    finally:
        sink.close()
        source.close()


def test_an_int8_pool_moves_its_values_and_scales_as_bytes():
    """An int8 pool's blocks carry each head row's scale in their own bytes: a pull between two such pools gives
    the destination the same values, and a float16 peer is refused."""
    from tests.test_kv_cache import CFG
    from tokenworks.model.kv_cache import KVCache, store_rows, widen
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src, dst = (KVCache(CFG, 4, 8, torch.int8, "cpu") for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for layer in range(CFG.num_layers):
        for cache in (src.k[layer], src.v[layer]):
            store_rows(cache, torch.tensor([2, 2, 6]), torch.tensor([0, 3, 1]), torch.randn(3, 2, 8, generator=gen))
    lay = layout(dtype="int8", head_dim=8, block_nbytes=src.block_nbytes)
    source, sink = TCPSource("p0", lay, src.tensor), TCPSink(lay, dst.tensor)
    half = TCPSink(layout(dtype="float16", block_nbytes=2 * 2 * 4 * 2 * 8 * 2),
                   torch.zeros(8, 2, 2, 4, 2, 8, dtype=torch.float16))
    try:
        assert sink.pull(source.peer(), "req-8", [2, 6], [5, 1], timeout=10) == 2 * src.block_nbytes
        assert torch.equal(dst.tensor[[5, 1]], src.tensor[[2, 6]])
        assert torch.equal(widen(dst.tensor[5], torch.float32), widen(src.tensor[2], torch.float32))
        with pytest.raises(KVLayoutMismatch):
            half.pull(source.peer(), "req-9", [2], [3], timeout=10)
    finally:
        for end in (half, sink, source):
            end.close()


@pytest.mark.skipif("nixl" not in transports(), reason="nixl is not installed")
def test_nixl_source_polls_slowly_while_no_blocks_are_held_and_still_serves(monkeypatch):
    """A worker holding no blocks for sinks tells its source so (``expect_pulls(False)``): the source's thread then
    polls every 50 ms instead of every 2 ms (a CPU engine beside it loses less of its cores), and a pull and its
    release still go through."""
    from tokenworks.transfer import nixl

    polls = []
    real_agent = nixl._agent

    class Counting:
        def __init__(self, agent):
            self.agent = agent

        def __getattr__(self, name):
            return getattr(self.agent, name)

        def get_new_notifs(self):
            polls.append(time.monotonic())
            return self.agent.get_new_notifs()

    monkeypatch.setattr(nixl, "_agent", lambda *a, **k: (lambda got: (Counting(got[0]), *got[1:]))(real_agent(*a, **k)))
    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source, sink = make_pair("nixl", src, dst, layout(), layout())
    try:
        def polls_in(seconds):
            n = len(polls)
            time.sleep(seconds)
            return len(polls) - n

        assert source.polling_fast  # until the worker says otherwise
        assert polls_in(0.5) >= 40  # every 2 ms: 250 on an idle machine
        source.expect_pulls(False)
        time.sleep(0.06)
        assert polls_in(0.5) <= 12  # every 50 ms: 10
        assert sink.pull(source.peer(), "req-1", [3], [5], timeout=10) == layout().block_nbytes
        assert torch.equal(dst[5], src[3])
        sink.release(source.peer(), "req-1")
        assert poll_releases(source) == ["req-1"]
        source.expect_pulls(True)
        assert polls_in(0.5) >= 40
    finally:
        sink.close()
        source.close()


@pytest.mark.parametrize("kind", transports())
def test_mismatched_layout_is_refused_before_any_byte_moves(kind):
    src = torch.randn(SHAPE)
    dst = torch.zeros(SHAPE)
    source, sink = make_pair(kind, src, dst, layout(block_size=4), layout(block_size=8))
    try:
        with pytest.raises(KVLayoutMismatch, match="block_size"):
            sink.pull(source.peer(), "req-2", [1], [1], timeout=5)
        assert dst.abs().sum() == 0
    finally:
        sink.close()
        source.close()


def test_check_layout_names_every_difference():
    with pytest.raises(KVLayoutMismatch) as e:
        check_layout(layout(), layout(dtype="bfloat16", num_layers=3, model="other"))
    msg = str(e.value)
    assert "dtype" in msg and "num_layers" in msg and "model" in msg


def test_tcp_source_rejects_bad_block_ids_and_unreachable_peer_is_seen_gone():
    from tokenworks.transfer.base import KVPeer, KVPeerGone, KVTransferRefused
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source, sink = TCPSource("p0", layout(), src), TCPSink(layout(), dst)
    try:
        with pytest.raises(KVTransferRefused, match="out of range"):
            sink.pull(source.peer(), "r", [0], [1], timeout=5)  # block 0 is never a real block
        dead = KVPeer(transport="tcp", worker_id="gone", layout=layout(), endpoint=f"tcp://127.0.0.1:{free_port()}")
        t0 = time.monotonic()
        with pytest.raises(KVPeerGone, match="connection refused"):
            sink.pull(dead, "r", [1], [1], timeout=10)
        assert time.monotonic() - t0 < 1.0  # refused at once, not after the 10 s timeout
    finally:
        sink.close()
        source.close()


def test_signed_codec_refuses_unsigned_tampered_stale_and_replayed_messages():
    import time as _time

    from tokenworks.codec import AuthError, Codec
    from tokenworks.worker import protocol as P

    signed = Codec(P.ToWorker, b"k1")
    msg = P.Abort("r1")
    assert signed.decode(signed.encode(msg)) == msg
    with pytest.raises(AuthError):
        signed.decode(Codec(P.ToWorker).encode(msg))  # unsigned
    with pytest.raises(AuthError):
        signed.decode(Codec(P.ToWorker, b"other").encode(msg))  # someone else's key
    raw = bytearray(signed.encode(msg))
    raw[1] ^= 0xFF
    with pytest.raises(AuthError):
        signed.decode(bytes(raw))  # tampered
    old = Codec(P.ToWorker, b"k1", max_age=0.05)
    data = old.encode(msg)
    _time.sleep(0.1)
    with pytest.raises(AuthError, match="stale"):
        old.decode(data)
    # a message sent again is refused, however fresh; the same request sent anew (another timestamp) is not
    receiver, sender = Codec(P.ToWorker, b"k1", max_age=0.2), Codec(P.ToWorker, b"k1")
    first = sender.encode(msg)
    assert receiver.decode(first) == msg
    with pytest.raises(AuthError, match="replayed"):
        receiver.decode(first)
    assert receiver.decode(sender.encode(msg)) == msg
    _time.sleep(0.25)  # once stale, forgotten: refused as stale, and the record is gone
    with pytest.raises(AuthError, match="stale"):
        receiver.decode(first)
    assert receiver.decode(sender.encode(msg)) == msg and len(receiver._seen) == 1


def test_tcp_source_with_a_secret_serves_only_signed_pulls():
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source = TCPSource("p0", layout(), src, secret=b"shared")
    good, stranger = TCPSink(layout(), dst, secret=b"shared"), TCPSink(layout(), dst)
    try:
        with pytest.raises(KVTransferError, match="refused"):
            stranger.pull(source.peer(), "r", [3], [4], timeout=5)
        assert dst.abs().sum() == 0
        good.pull(source.peer(), "r", [3], [4], timeout=5)
        assert torch.equal(dst[4], src[3])
    finally:
        good.close()
        stranger.close()
        source.close()


# -- staging: the bytes of a request's blocks out of one pool and into another --------------------------

def test_runs_groups_ids_that_count_up_together():
    from tokenworks.transfer.staging import runs

    assert runs([3, 4, 5, 9, 10, 2], [7, 8, 9, 1, 2, 3]) == [(3, 7, 3), (9, 1, 2), (2, 3, 1)]
    assert runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert runs([], []) == []


@pytest.mark.parametrize("ids", [([3, 4, 5], [6, 7, 8]), ([3, 7, 1, 4, 9, 2, 10, 5, 6, 11], [11, 1, 9, 2, 3, 8, 4, 7, 5, 6])],
                         ids=["one-run", "scattered"])
def test_copy_blocks_moves_exactly_the_asked_blocks(device, ids):
    from tokenworks.transfer.staging import block_view, copy_blocks

    src_ids, dst_ids = ids
    src = torch.randn(SHAPE, device=device)
    dst = torch.zeros(SHAPE, device=device)
    copy_blocks(block_view(src), block_view(dst), src_ids, dst_ids)
    if device != "cpu":
        torch.cuda.synchronize()
    for s_, d_ in zip(src_ids, dst_ids):
        assert torch.equal(dst[d_], src[s_])
    untouched = [b for b in range(SHAPE[0]) if b not in dst_ids]
    assert dst[untouched].abs().sum() == 0


@pytest.mark.parametrize("split", ["one frame", "per block", "uneven"])
def test_staging_round_trip_through_bytes_with_non_contiguous_ids(device, split):
    """read() on one pool, write() on another: exactly the asked blocks move, whatever the frames' split."""
    from tokenworks.transfer.staging import block_io

    src = torch.randn(SHAPE, device=device)
    dst = torch.zeros(SHAPE, device=device)
    src_ids, dst_ids = [9, 2, 5, 6, 11], [1, 10, 3, 4, 7]
    frames = block_io(src).read(src_ids)
    data = b"".join(bytes(f) for f in frames)
    nb = len(data) // len(src_ids)
    if split == "one frame":
        frames = [memoryview(data)]
    elif split == "per block":
        frames = [memoryview(data[i * nb:(i + 1) * nb]) for i in range(len(src_ids))]
    else:
        frames = [memoryview(data[:nb // 2]), memoryview(data[nb // 2: 3 * nb]), memoryview(data[3 * nb:])]
    block_io(dst).write(frames, dst_ids)
    for s_, d_ in zip(src_ids, dst_ids):
        assert torch.equal(dst[d_], src[s_])
    assert dst[[b for b in range(SHAPE[0]) if b not in dst_ids]].abs().sum() == 0
    with pytest.raises(ValueError, match="expected 2 blocks"):
        block_io(dst).write([memoryview(data[:nb])], [1, 2])  # too few bytes: refused, nothing half-written


def test_tcp_pull_between_pools_on_the_device(device):
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src = torch.randn(SHAPE, device=device)
    dst = torch.zeros(SHAPE, device=device)
    source, sink = TCPSource("p0", layout(), src), TCPSink(layout(), dst)
    try:
        assert sink.pull(source.peer(), "r", [8, 3, 4, 1], [2, 6, 7, 11], timeout=10) == 4 * layout().block_nbytes
        for s_, d_ in zip([8, 3, 4, 1], [2, 6, 7, 11]):
            assert torch.equal(dst[d_], src[s_])
    finally:
        sink.close()
        source.close()


# -- failures seen at once, pulls independent of each other -------------------------------------------------

SILENT_SOURCE = """
import sys, time, zmq
sock = zmq.Context.instance().socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
time.sleep(60)  # connected, never answers
"""


def silent_source():
    """A source process that accepts connections and never answers: (process, its KVPeer card)."""
    import subprocess
    import sys

    from tokenworks.transfer.base import KVPeer

    proc = subprocess.Popen([sys.executable, "-c", SILENT_SOURCE], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, KVPeer(transport="tcp", worker_id="silent", layout=layout(), endpoint=f"tcp://127.0.0.1:{port}")


def test_a_source_killed_mid_pull_fails_the_pull_within_a_second():
    import signal
    import threading

    from tokenworks.transfer.base import KVPeerGone
    from tokenworks.transfer.tcp import TCPSink

    proc, peer = silent_source()
    sink = TCPSink(layout(), torch.zeros(SHAPE))
    result = {}

    def pull():
        try:
            sink.pull(peer, "r", [1], [1], timeout=30)
        except Exception as e:  # noqa: BLE001
            result["error"], result["at"] = e, time.monotonic()

    t = threading.Thread(target=pull)
    try:
        t.start()
        time.sleep(0.5)  # the pull is waiting on a connected source
        assert t.is_alive()
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        t.join(timeout=5)
        assert isinstance(result.get("error"), KVPeerGone), result
        assert result["at"] - killed < 1.0
    finally:
        proc.kill()
        proc.wait()
        t.join(timeout=5)
        sink.close()


def test_a_dead_source_thread_closes_its_socket_and_reports_a_problem():
    from tokenworks.transfer.base import KVPeerGone
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source, sink = TCPSource("p0", layout(), src), TCPSink(layout(), dst)
    try:
        sink.pull(source.peer(), "r0", [2], [3], timeout=5)  # connected and serving
        assert source.problem() is None

        def broken(received):
            raise RuntimeError("injected")

        source._answer = broken  # the next message kills the serving thread
        t0 = time.monotonic()
        with pytest.raises(KVPeerGone, match="closed"):
            sink.pull(source.peer(), "r1", [4], [5], timeout=10)
        assert time.monotonic() - t0 < 1.0
        assert "died" in source.problem() and "injected" in source.problem()
        assert dst[5].abs().sum() == 0
    finally:
        sink.close()
        source.close()


def pull_job(request_id, peer, remote, local):
    from types import SimpleNamespace

    from tokenworks.worker.pulls import PullJob

    return PullJob(SimpleNamespace(request_id=request_id), peer, remote, local, time.monotonic())


@contextlib.contextmanager
def pulls_from_a_silent_and_a_live_source(timeout: float):
    """A PullPool (TCP sinks into ``dst``) with a source that never answers and a live one over ``src``: yields
    (pool, the silent one's card, the live TCPSource, src, dst); closes them all after."""
    from tokenworks.transfer.tcp import TCPSink, TCPSource
    from tokenworks.worker.pulls import PullPool

    proc, silent = silent_source()
    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source = TCPSource("p0", layout(), src)
    pool = PullPool(lambda: TCPSink(layout(), dst), timeout=timeout, block_nbytes=layout().block_nbytes)
    try:
        yield pool, silent, source, src, dst
    finally:
        pool.close()
        source.close()
        proc.kill()
        proc.wait()


def wait_for_pull(pool, rid: str, limit: float):
    """(the finished PullJob ``rid``, seconds waited); what else finishes meanwhile is dropped."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        for job in pool.finished():
            if job.request.request_id == rid:
                return job, time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"{rid} not finished in {limit} s")


def test_concurrent_pulls_complete_independently_of_a_silent_peer():
    with pulls_from_a_silent_and_a_live_source(timeout=2.0) as (pool, silent, source, src, dst):
        t0 = time.monotonic()
        pool.submit(pull_job("slow", silent, [1, 2], [1, 2]))
        pool.submit(pull_job("fast", source.peer(), [3, 9], [5, 6]))
        done = {}
        while "fast" not in done and time.monotonic() - t0 < 5:
            done.update({j.request.request_id: (j, time.monotonic() - t0) for j in pool.finished()})
            time.sleep(0.01)
        job, took = done["fast"]
        assert job.ok and took < 1.0 and "slow" not in done  # not queued behind the silent peer
        assert torch.equal(dst[5], src[3]) and torch.equal(dst[6], src[9])
        assert poll_releases(source) == ["fast"]
        while "slow" not in done and time.monotonic() - t0 < 10:
            done.update({j.request.request_id: (j, time.monotonic() - t0) for j in pool.finished()})
            time.sleep(0.01)
        slow, _ = done["slow"]
        assert not slow.ok and slow.cause == "timeout"
        assert pool.problem() is None and pool.inflight_bytes == 0


def test_a_source_declared_dead_fails_its_waiting_pulls_at_once_and_not_those_sent_after():
    """A source that hangs (accepts, never answers) would hold a pull for --kv-timeout; the router's notice that
    it is dead ends the pull at once as peer_gone. A pull submitted after a notice goes ahead: a source that was
    only paused comes back under the same card."""
    with pulls_from_a_silent_and_a_live_source(timeout=20.0) as (pool, silent, source, src, dst):
        pool.submit(pull_job("hung", silent, [1, 2], [1, 2]))
        time.sleep(0.3)  # the pull is waiting on the silent source
        pool.peer_gone(silent.card)
        job, took = wait_for_pull(pool, "hung", 5)
        assert not job.ok and job.cause == "peer_gone" and "declared dead" in job.error and took < 1.0
        pool.peer_gone(source.peer().card)  # a pause the router took for a death...
        time.sleep(0.01)
        pool.submit(pull_job("after", source.peer(), [3], [5]))  # ...then the source is heard again
        job, _ = wait_for_pull(pool, "after", 5)
        assert job.ok and torch.equal(dst[5], src[3])
        assert pool.problem() is None and pool.inflight_bytes == 0


def test_in_flight_bytes_are_bounded():
    import threading

    from tokenworks.transfer.base import KVSink
    from tokenworks.worker.pulls import PullPool

    peak, lock, gate = [0, 0], threading.Lock(), threading.Event()

    class Counting(KVSink):
        def pull(self, peer, request_id, remote, local, timeout, gone=lambda: False):
            with lock:
                peak[0] += len(local)
                peak[1] = max(peak[1], peak[0])
            gate.wait(2)
            with lock:
                peak[0] -= len(local)
            return len(local)

        def release(self, peer, request_id):
            pass

    # 4 threads, room for 3 blocks in flight: pulls of 2 blocks go one at a time; one of 5 goes alone.
    pool = PullPool(Counting, timeout=1.0, block_nbytes=1, max_inflight_bytes=3)
    peer = KVPeer("tcp", "p0", layout(), endpoint="tcp://127.0.0.1:9")
    try:
        for i, n in enumerate([2, 2, 2, 5]):
            pool.submit(pull_job(f"r{i}", peer, list(range(n)), list(range(n))))
        time.sleep(0.3)
        gate.set()
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 4 and time.monotonic() < deadline:
            got += pool.finished()
            time.sleep(0.01)
        assert len(got) == 4 and all(j.ok for j in got)
        assert peak[1] == 5  # never more than the bound, except one request larger than it, alone
    finally:
        pool.close()


def test_a_dead_pull_thread_is_reported():
    from tokenworks.transfer.base import KVSink
    from tokenworks.worker.pulls import PullPool

    class Dying(KVSink):
        def pull(self, *a):
            raise SystemExit("thread killed")

        def release(self, *a):
            pass

    pool = PullPool(Dying, timeout=1.0, block_nbytes=1, num_threads=1)
    try:
        assert pool.problem() is None
        pool.submit(pull_job("r", KVPeer("tcp", "p0", layout(), endpoint="tcp://127.0.0.1:9"), [1], [1]))
        deadline = time.monotonic() + 2
        while pool.problem() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "died" in pool.problem() and "thread killed" in pool.problem()
    finally:
        pool.close()


def test_cuda_ipc_pull_from_another_process_is_byte_exact(device):
    """Same-host GPU path: a source process exports its CUDA pool, this process copies blocks device to device."""
    if not device.startswith("cuda"):
        pytest.skip("CUDA IPC needs a CUDA device (run with --device cuda)")
    import multiprocessing as mp

    from tokenworks.planner.profiler import block_pattern, kv_source_process
    from tokenworks.transfer.cuda_ipc import CudaIpcSink, OpenedPools, same_host_gpu
    from tokenworks.transfer.staging import block_view
    from tokenworks.transfer.tcp import TCPSink

    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=kv_source_process,
                                           args=("tcp", layout(), SHAPE, "float32", child, device, True), daemon=True)
    proc.start()
    dst = torch.zeros(SHAPE, device=device)
    sink = None
    try:
        peer = parent.recv()
        assert same_host_gpu(peer)
        sink = CudaIpcSink(TCPSink(layout(), dst), layout(), dst, OpenedPools())
        remote, local = [3, 4, 5, 9, 1], [7, 8, 9, 2, 11]
        assert sink.pull(peer, "r", remote, local, timeout=10) == 5 * layout().block_nbytes
        for r, l_ in zip(remote, local):
            assert torch.equal(block_view(dst)[l_], block_pattern(r, layout().block_nbytes, device))
        assert dst[[b for b in range(SHAPE[0]) if b not in local]].abs().sum() == 0
        with pytest.raises(KVLayoutMismatch):
            CudaIpcSink(TCPSink(layout(block_size=8), dst), layout(block_size=8), dst, OpenedPools()).pull(
                peer, "r", [1], [1], timeout=5)
    finally:
        if sink is not None:
            sink.close()
        parent.send("stop")
        proc.join(timeout=10)


@pytest.mark.skipif("nixl" not in transports(), reason="nixl is not installed")
@pytest.mark.parametrize("pull_first", [True, False], ids=["connected-before", "never-connected"])
def test_a_nixl_pull_from_a_killed_source_fails_at_once_as_peer_gone(pull_first):
    """A NIXL source whose process was SIGKILLed: the next pull fails as KVPeerGone well within its 30 s timeout
    (measured: under 10 ms), whether the sink had read from it before or not, so the decode worker recomputes at
    once and the failure is counted as peer_gone."""
    import json
    import os
    import subprocess
    import sys

    helper = os.path.join(os.path.dirname(__file__), "nixl_dead_source.py")
    run = subprocess.run([sys.executable, helper, "sink", *(["--pull-first"] if pull_first else [])],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[-1])
    assert result["error"] == "KVPeerGone" and result["cause"] == "peer_gone", result
    assert result["seconds"] < 5.0, result


@pytest.mark.skipif("nixl" not in transports(), reason="nixl is not installed")
def test_a_nixl_pull_from_a_stopped_source_ends_when_the_source_is_declared_dead():
    """A NIXL source SIGSTOPped before any pull: the read waits on it (30 s timeout) until ``gone()`` says the
    router declared it dead, 0.5 s in; then it fails as peer_gone."""
    import json
    import os
    import subprocess
    import sys

    helper = os.path.join(os.path.dirname(__file__), "nixl_dead_source.py")
    run = subprocess.run([sys.executable, helper, "sink", "--stop"], capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[-1])
    assert result["error"] == "KVPeerGone" and "declared dead" in result["message"], result
    assert 0.5 <= result["seconds"] < 3.0, result
