"""KV transports moving real blocks between two pools; layout checks."""

import time

import pytest
import torch

from tokenworks.transfer.base import KVLayout, KVLayoutMismatch, KVTransferError, check_layout

SHAPE = (12, 2, 2, 4, 2, 8)  # blocks, layers, k/v, block_size, kv heads, head_dim


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


def test_tcp_source_rejects_bad_block_ids_and_unreachable_peer_times_out():
    from tokenworks.transfer.base import KVPeer
    from tokenworks.transfer.tcp import TCPSink, TCPSource

    src, dst = torch.randn(SHAPE), torch.zeros(SHAPE)
    source, sink = TCPSource("p0", layout(), src), TCPSink(layout(), dst)
    try:
        with pytest.raises(KVTransferError, match="out of range"):
            sink.pull(source.peer(), "r", [0], [1], timeout=5)  # block 0 is never a real block
        dead = KVPeer(transport="tcp", worker_id="gone", layout=layout(), endpoint="tcp://127.0.0.1:9")
        with pytest.raises(KVTransferError, match="timed out"):
            sink.pull(dead, "r", [1], [1], timeout=0.3)
    finally:
        sink.close()
        source.close()


def test_signed_codec_refuses_unsigned_tampered_and_stale_messages():
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
