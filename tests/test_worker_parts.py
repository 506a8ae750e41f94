"""Parts of a worker process tested on their own: the GPU warm-up's effect on the engine, and what the
router does when a worker says it is unhealthy."""

import asyncio
import contextlib
import time

import pytest
import zmq
import zmq.asyncio

from tokenworks.config import EngineArgs, ModelConfig


def tiny_engine(device: str, **options):
    from tokenworks.llm import build_random_engine

    cfg = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position=256, tie_word_embeddings=True)
    args = EngineArgs(device=device, dtype="float32", num_blocks=64, max_num_batched_tokens=96, max_num_seqs=8,
                      **options)
    return build_random_engine(args, cfg, "tiny")


def test_warm_up_runs_prefills_and_decode_batches_and_leaves_the_pool_as_it_was(device):
    from tokenworks.sampling_params import SamplingParams
    from tokenworks.worker.warmup import warm_up

    loaded = tiny_engine(device)
    engine, pool = loaded.engine, loaded.pool
    seen = []
    step = engine.step

    def counting_step():
        sched_before = len(engine.scheduler.running)
        out = step()
        seen.append((sched_before, len(out)))
        return out

    engine.step = counting_step
    steps, seconds = warm_up(engine, loaded.runner.kv.tensor, pool)
    assert steps == len(seen) and steps > 0 and seconds > 0
    assert max(n for n, _ in seen) == 8  # a decode step at max_num_seqs
    assert not engine.has_unfinished() and pool.num_used_blocks == 0
    assert pool.num_cached_idle_blocks == 0  # the warm-up's prompts are not left in the prefix cache
    pool.check_integrity()
    engine.step = step
    # The engine serves normally afterwards, prefix caching included.
    out = []
    for _ in range(2):
        engine.add_request(f"r{len(out)}", list(range(1, 40)), SamplingParams(temperature=0, max_tokens=3))
        while engine.has_unfinished():
            out += [o for o in engine.step() if o.finished]
    assert len(out) == 2 and out[0].token_ids == out[1].token_ids and out[1].num_cached_tokens == 32


async def router_with_workers(roles: dict[str, str]):
    """A started Router that has registered a stand-in worker (a Ready message, no process) for each id -> role,
    and the PUSH socket those messages came on (send it more; close it and the router after)."""
    from tokenworks.codec import Codec
    from tokenworks.router.router import Router
    from tokenworks.worker import protocol as P

    router = Router(block_size=16, local_prefill_threshold=16)
    router.start()
    push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(router.events_endpoint)
    enc = Codec(P.FromWorker)
    for wid, role in roles.items():
        router.expect(wid)
        await push.send(enc.encode(P.Ready(wid, role, 1, "m", "tcp://127.0.0.1:9", 256, 16, 10, None, [0], 0.1)))
    deadline = time.monotonic() + 5
    while len(router.workers) < len(roles) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return router, push


def test_an_unhealthy_worker_is_taken_out_of_routing_at_once():
    from tokenworks.codec import Codec
    from tokenworks.worker import protocol as P

    async def main():
        router, push = await router_with_workers({"prefill-0": "prefill", "decode-0": "decode"})
        enc = Codec(P.FromWorker)
        prompt = list(range(100))
        assert router.policy.place(router.view(), prompt).prefill.worker_id == "prefill-0"
        await push.send(b"\xc1 not msgpack")  # refused and counted; the reader goes on to the next message
        await push.send(enc.encode(P.Unhealthy("prefill-0", "the KV source thread died: RuntimeError: x")))
        t0 = time.monotonic()
        while router.workers["prefill-0"].alive(router.heartbeat_timeout) and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        assert time.monotonic() - t0 < 1.0
        placement = router.policy.place(router.view(), prompt)
        assert placement.prefill is None and placement.decode.worker_id == "decode-0"  # prefilled locally now
        text = router.metrics.registry.get_sample_value("tokenworks:worker_unhealthy_total",
                                                        {"reason": "the KV source thread died"})
        assert text == 1.0 and router.num_refused_messages == 1
        push.close(0)
        router.close()

    asyncio.run(main())


def test_the_workers_that_pull_kv_are_told_once_when_a_source_dies():
    """A KV source the router counts dead (it said it is unhealthy, or went silent past the heartbeat timeout):
    each decode and aggregated worker gets one PeerGone with its card (so its pulls from it fail now, not at
    --kv-timeout); prefill workers get none. A source heard again and then silent again is told again."""
    from tokenworks.codec import Codec
    from tokenworks.router.router import Router
    from tokenworks.transfer.base import KVLayout, KVPeer
    from tokenworks.worker import protocol as P

    async def main():
        router = Router(block_size=16, local_prefill_threshold=16, heartbeat_timeout=0.6)
        router.start()
        ctx = zmq.asyncio.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(router.events_endpoint)
        enc, dec = Codec(P.FromWorker), Codec(P.ToWorker)
        inboxes = {}
        layout = KVLayout("m", "float32", 2, 2, 8, 16, 2048)
        for wid, role in {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode",
                          "agg-0": "both"}.items():
            inbox = inboxes[wid] = ctx.socket(zmq.PULL)
            port = inbox.bind_to_random_port("tcp://127.0.0.1")
            peer = KVPeer("tcp", wid, layout, endpoint=f"tcp://127.0.0.1:{40000 + len(inboxes)}")
            router.expect(wid)
            await push.send(enc.encode(P.Ready(wid, role, 1, "m", f"tcp://127.0.0.1:{port}", 256, 16, 10, peer,
                                               [0], 0.1)))
        while len(router.workers) < 4:
            await asyncio.sleep(0.01)
        beating = {"decode-0", "agg-0", "prefill-1"}
        got = {wid: [] for wid in inboxes}

        async def run_for(seconds):  # heartbeats (Stats) from ``beating`` every 0.1 s; notices into ``got``
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                for wid in beating:
                    await push.send(enc.encode(P.Stats(wid, 0, 0, 0, 0, 0, 10, 0, 0, True)))
                for wid, inbox in inboxes.items():
                    while await inbox.poll(0):
                        got[wid].append(dec.decode(await inbox.recv()))
                await asyncio.sleep(0.1)

        card = {w: h.ready.kv_peer.card for w, h in router.workers.items()}
        await push.send(enc.encode(P.Unhealthy("prefill-0", "the KV source thread died: RuntimeError: x")))
        await run_for(1.5)
        assert got["decode-0"] == [P.PeerGone("prefill-0", card["prefill-0"])] == got["agg-0"]
        assert got["prefill-0"] == [] == got["prefill-1"]
        beating.discard("prefill-1")  # silent past the heartbeat timeout: told once
        await run_for(1.5)
        beating.add("prefill-1")  # heard again (a pause), then silent again: told again
        await run_for(0.5)
        beating.discard("prefill-1")
        await run_for(1.5)
        gone_1 = P.PeerGone("prefill-1", card["prefill-1"])
        assert got["decode-0"][1:] == [gone_1, gone_1] == got["agg-0"][1:]
        assert got["prefill-0"] == []
        for s in (push, *inboxes.values()):
            s.close(0)
        router.close()

    asyncio.run(main())


def test_a_cold_worker_refuses_past_its_first_requests_with_a_short_retry_after():
    """Before its first first token a worker takes COLD_QUEUE requests; the next is told to come back in about the
    time that first token takes (with it comes a measured rate), not after the whole queue limit (30 s: a
    closed-loop benchmark then lost 36 of 40 requests to a server that had started a second before)."""
    from tokenworks.router.admission import COLD_QUEUE, COLD_RETRY_AFTER

    async def main():
        router, push = await router_with_workers({"agg-0": "both"})
        prompt = list(range(100))
        assert router.admission_check(prompt) is None
        rates = router.view()[0].rates
        for _ in range(COLD_QUEUE):  # queued for a first token, none measured yet
            rates.started(time.monotonic())
        assert router.admission_check(prompt) == COLD_RETRY_AFTER == 1.0
        rates.done(time.monotonic() + 0.5, 100)  # a first token: now a measured rate decides
        assert router.admission_check(prompt) is None
        push.close(0)
        router.close()

    asyncio.run(main())


@contextlib.contextmanager
def real_worker(folder, *flags: str, **engine_args):
    """A worker process (role both, TCP KV) on a tiny checkpoint built in ``folder``: yields (its Ready, a PUSH
    socket to its commands, a PULL socket of its events, the two codecs); shuts it down after."""
    import json
    import subprocess
    import sys

    from tests.test_tiny_checkpoints import build
    from tokenworks.codec import Codec
    from tokenworks.worker import protocol as P

    build("llama3-rope", folder)
    ctx = zmq.Context.instance()
    events = ctx.socket(zmq.PULL)
    events.setsockopt(zmq.LINGER, 0)
    events_port = events.bind_to_random_port("tcp://127.0.0.1")
    args = json.dumps({"model": str(folder), "dtype": "float32", "num_blocks": 64, "block_size": 4, **engine_args})
    proc = subprocess.Popen([sys.executable, "-m", "tokenworks.worker.server", "--worker-id", "w0", "--role", "both",
                             "--commands", "tcp://127.0.0.1:*", "--events", f"tcp://127.0.0.1:{events_port}",
                             "--engine-args", args, "--kv-transport", "tcp", *flags])
    commands = ctx.socket(zmq.PUSH)
    commands.setsockopt(zmq.LINGER, 0)
    to_worker, from_worker = Codec(P.ToWorker), Codec(P.FromWorker)
    try:
        assert events.poll(120_000), "the worker never reported ready"
        ready = from_worker.decode(events.recv())
        assert isinstance(ready, P.Ready) and ready.commands_endpoint.startswith("tcp://127.0.0.1:")
        commands.connect(ready.commands_endpoint)  # the port the worker's system picked
        yield ready, commands, events, to_worker, from_worker
    finally:
        commands.send(to_worker.encode(P.Shutdown()))
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        commands.close(0)
        events.close(0)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_worker_sends_one_message_per_step_with_every_request_in_it(tmp_path, overlap):
    """A real worker process: three requests decode together; each step's tokens come in one Outputs message,
    token ids only (the router detokenizes); nothing after a request's last output, and the pool empty after
    (overlapped too: the extra step in flight for a stopped request is never sent)."""
    from tokenworks.sampling_params import SamplingParams
    from tokenworks.worker import protocol as P

    with real_worker(tmp_path, overlap_schedule=overlap) as (ready, commands, events, to_worker, from_worker):
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        for i in range(3):
            commands.send(to_worker.encode(P.Submit(f"r{i}", [5 + i, 9, 11, 13, 17, 19], params, "full")))
        steps: list[P.Outputs] = []
        tokens = {f"r{i}": 0 for i in range(3)}
        idle = None
        while idle is None:
            assert events.poll(30_000), f"outputs stopped: {tokens}"
            msg = from_worker.decode(events.recv())
            if isinstance(msg, P.Outputs):
                steps.append(msg)
                for o in msg.outputs:
                    tokens[o.request_id] += len(o.new_token_ids)
            elif isinstance(msg, P.Stats) and sum(tokens.values()) == 15 and msg.idle:
                idle = msg
        assert tokens == {"r0": 5, "r1": 5, "r2": 5}
        assert idle.blocks_used == 0 and idle.num_running == 0  # nothing left held or in flight
        together = [m for m in steps if {o.request_id for o in m.outputs} == set(tokens)]
        assert len(together) >= 4  # the decode steps: one message carries all three requests' tokens
        assert all(len(o.new_token_ids) == 1 for m in steps for o in m.outputs)
        last = {o.request_id: o for m in steps for o in m.outputs}
        assert all(o.finished and o.finish_reason == "length" for o in last.values())
        assert not any(hasattr(o, "new_text") for m in steps for o in m.outputs)  # ids only


def test_a_worker_pulling_from_a_hung_source_recomputes_when_told_it_is_gone(tmp_path):
    """A real worker process pulls a prompt's KV from a source that accepts and never answers (a stopped
    process); with --kv-timeout 60 it would wait a minute. The router's PeerGone ends the pull at once: the
    worker recomputes the prompt and the request finishes, its first output saying why."""
    from tests.test_transfer import silent_source
    from tokenworks.sampling_params import SamplingParams
    from tokenworks.transfer.base import KVPeer
    from tokenworks.worker import protocol as P

    hung, card = silent_source()
    try:
        with real_worker(tmp_path, "--kv-timeout", "60") as (ready, commands, events, to_worker, from_worker):
            peer = KVPeer("tcp", "p-hung", ready.kv_peer.layout, endpoint=card.endpoint)  # the worker's own layout
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            commands.send(to_worker.encode(P.Submit("r0", [5, 9, 11, 13, 17, 19, 23, 29, 31], params, "decode",
                                                    first_token=7, kv_peer=peer, kv_block_ids=[1, 2, 3])))
            time.sleep(1.0)  # the pull waits on the hung source
            commands.send(to_worker.encode(P.PeerGone("p-hung", peer.card)))
            told = time.monotonic()
            outputs = []
            while not (outputs and outputs[-1].finished):
                assert events.poll(10_000), "no output after the notice"
                msg = from_worker.decode(events.recv())
                if isinstance(msg, P.Outputs):
                    outputs += [o for o in msg.outputs if o.request_id == "r0"]
            assert outputs[0].kv_fallback and outputs[0].kv_failure == "peer_gone"
            assert time.monotonic() - told < 5  # not the 60 s timeout
            # the first of the 4 tokens came from the prefill worker (first_token); the decode side makes the rest
            assert sum(len(o.new_token_ids) for o in outputs) == 3 and outputs[-1].finish_reason == "length"
    finally:
        hung.kill()
        hung.wait()


def test_serve_picks_its_layout_from_the_machine_and_says_why():
    from argparse import Namespace

    from tokenworks.cli import serve_layout

    none = Namespace(prefill_workers=None, decode_workers=None, aggregated_workers=None)
    assert serve_layout(none, None, 2)[0] == (0, 0, 1)  # a 2-core laptop: one worker on both cores
    assert "ms/token aggregated" in serve_layout(none, None, 2)[1]
    assert serve_layout(none, None, 16)[0] == (1, 1, 0)
    assert serve_layout(none, [0], 2)[0] == (1, 1, 0)
    asked = Namespace(prefill_workers=2, decode_workers=None, aggregated_workers=1)
    assert serve_layout(asked, None, 2) == ((2, 0, 1), "as asked")


def test_streamed_events_spliced_from_bytes_equal_the_dict_path():
    import json

    from tokenworks.router.api import ChunkEncoder
    from tokenworks.router.router import Delta

    texts = [" hé\"llo\n\u2028 \\ end", "", "\x00\x1f tab\t"]
    for kind in ("chat", "completions"):
        for include_usage in (False, True):
            enc = ChunkEncoder(kind, "cmpl-r-7-1", 1_700_000_000, 'model "q"', include_usage, want_logprobs=False)
            for i, text in enumerate(texts):
                for reason in (None, "length", "stop"):
                    d = Delta([5], text, reason is not None, reason, 3, [])
                    fast, slow = enc.chunk(i, d), enc.chunk_from_dict(i, d)
                    assert fast == slow, (fast, slow)
                    event = json.loads(fast.removeprefix(b"data: "))
                    choice = event["choices"][0]
                    assert (choice["delta"]["content"] if kind == "chat" else choice["text"]) == text
                    assert choice["finish_reason"] == reason and choice["index"] == i
                    assert ("usage" in event) == include_usage
            if kind == "chat":  # the role event opens a chat stream; it takes the dict path
                role = enc.chunk(0, None, role=True)
                assert json.loads(role.removeprefix(b"data: "))["choices"][0]["delta"] == {"role": "assistant",
                                                                                         "content": ""}
