"""The token lane (router/stream.py) and the response it writes into (router/sse.py): events written from outside the
response's task and events of its body go out in the order given, also when the server applies back-pressure; a
client that leaves ends the body; nothing a lane does can reach the router's reader as an exception.

The ASGI server is scripted here (its ``send`` suspends when the test says, as uvicorn's does when its transport is
paused) because real back-pressure cannot be produced on demand; the real server runs these paths in
test_serving.py and the fault tests."""

from __future__ import annotations

import asyncio

import pytest

from tokenworks.router.sse import RAW_SEND, EventStream
from tokenworks.router.stream import RequestStream


class ScriptedServer:
    """An ASGI server's side of one response: records what is sent; ``pause()`` makes the next sends wait."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.resume = asyncio.Event()
        self.resume.set()
        self.disconnect = asyncio.Event()
        self.busy = False

    def pause(self) -> None:
        self.resume.clear()

    async def send(self, message: dict) -> None:
        assert not self.busy, "a send began while another was suspended (ASGI promises nothing for that)"
        self.busy = True
        try:
            await self.resume.wait()  # suspends only while paused, as uvicorn's send does
        finally:
            self.busy = False
        self.sent.append(message)

    async def receive(self) -> dict:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m.get("more_body")]


def test_written_and_body_events_keep_their_order_through_back_pressure():
    async def main():
        server = ScriptedServer()
        step = asyncio.Queue()

        async def body():
            yield b"b0"
            await step.get()  # the test writes from outside while the body waits, as the reader does
            yield b"b1"

        response = EventStream(body())
        task = asyncio.ensure_future(response(scope={}, receive=server.receive, send=server.send))
        await asyncio.sleep(0.01)  # started; the body sent b0 and waits
        response.write(b"w0")  # the server has room: on the wire at once, no task switch
        assert server.bodies() == [b"b0", b"w0"]
        server.pause()
        response.write(b"w1")  # suspends in the server: finished later by a task
        response.write(b"w2")  # waits behind it
        step.put_nowait(None)  # the body's next event comes while the server is paused
        await asyncio.sleep(0.01)
        assert server.bodies() == [b"b0", b"w0"]
        server.resume.set()
        await asyncio.wait_for(task, 5)
        assert server.bodies() == [b"b0", b"w0", b"w1", b"w2", b"b1"]
        assert server.sent[0]["type"] == "http.response.start"
        assert server.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    asyncio.run(main())


def test_events_written_before_the_response_starts_go_out_first():
    async def main():
        server = ScriptedServer()

        async def body():
            yield b"b0"

        response = EventStream(body())
        response.write(b"early")
        await asyncio.wait_for(response(scope={}, receive=server.receive, send=server.send), 5)
        assert server.bodies() == [b"early", b"b0"]

    asyncio.run(main())


def test_a_client_that_leaves_ends_the_body_and_nothing_more_is_sent():
    async def main():
        server = ScriptedServer()
        ended = asyncio.Event()

        async def body():
            try:
                yield b"b0"
                await asyncio.Event().wait()  # a request that would run on
                yield b"never"
            finally:
                ended.set()  # where the API's clean-up aborts the request on its workers

        response = EventStream(body())
        task = asyncio.ensure_future(response(scope={}, receive=server.receive, send=server.send))
        await asyncio.sleep(0.01)
        server.disconnect.set()
        await asyncio.wait_for(task, 5)
        assert ended.is_set()
        assert server.bodies() == [b"b0"]
        assert not any(m.get("more_body") is False for m in server.sent)

    asyncio.run(main())


def test_a_send_that_fails_under_a_write_ends_the_response_with_that_error():
    async def main():
        server = ScriptedServer()
        ended = asyncio.Event()

        async def broken_send(message):
            if message.get("body") == b"bad":
                raise RuntimeError("transport gone")
            await server.send(message)

        async def body():
            try:
                yield b"b0"
                await asyncio.Event().wait()
            finally:
                ended.set()

        response = EventStream(body())
        task = asyncio.ensure_future(response(scope={}, receive=server.receive, send=broken_send))
        await asyncio.sleep(0.01)
        response.write(b"bad")  # must not raise into the writer (the router's reader)
        with pytest.raises(RuntimeError, match="transport gone"):
            await asyncio.wait_for(task, 5)
        assert ended.is_set()

    asyncio.run(main())


def test_a_lane_takes_messages_only_while_open_and_gives_back_the_rest_in_order():
    async def main():
        stream = RequestStream()
        taken: list = []

        def lane(msg):
            if msg == "end":
                return "end (seen by the task)"
            if msg == "boom":
                raise ValueError("lane broke")
            taken.append(msg)
            return None

        stream.put("first")  # no lane yet: for the task
        assert await stream.get() == "first"
        stream.open_lane(lane)
        stream.put(1)
        stream.put(2)
        assert taken == [1, 2]
        stream.put("end")  # given back: queued for the task, and the lane stays shut behind it
        stream.put(3)
        assert taken == [1, 2]
        assert await stream.get() == "end (seen by the task)"
        assert await stream.get() == 3  # the lane is shut while the task works: 3 was queued, in order
        stream.open_lane(lane)
        stream.put("boom")  # a lane that raises: the error goes to the task, not to whoever called put
        err = await stream.get()
        assert isinstance(err, ValueError) and str(err) == "lane broke"
        stream.put(4)  # the lane was shut by its error
        assert await stream.get() == 4 and taken == [1, 2]

    asyncio.run(main())


def test_a_waiting_task_is_woken_by_a_message_the_lane_gives_back():
    async def main():
        stream = RequestStream()
        stream.open_lane(lambda msg: msg if msg == "end" else None)
        waiter = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        stream.put("token")  # taken by the lane: the task sleeps on
        await asyncio.sleep(0.01)
        assert not waiter.done()
        stream.put("end")
        assert await asyncio.wait_for(waiter, 5) == "end"

    asyncio.run(main())


def test_body_events_go_to_the_servers_own_send_when_the_app_kept_it():
    async def main():
        server = ScriptedServer()
        wrapped: list[str] = []

        async def middleware_send(message):  # what Starlette's middleware does: watch, then pass on
            wrapped.append(message["type"])
            await server.send(message)

        async def body():
            yield b"b0"

        response = EventStream(body())
        await asyncio.wait_for(response(scope={RAW_SEND: server.send}, receive=server.receive, send=middleware_send), 5)
        assert wrapped == ["http.response.start"]  # the middleware saw the start; the events went past it
        assert server.bodies() == [b"b0"] and server.sent[-1]["more_body"] is False

    asyncio.run(main())


def test_real_server_back_pressure_keeps_every_written_event_in_order():
    """Real uvicorn, a client that does not read for a while: the writes fill the socket, uvicorn pauses its
    transport and the sends suspend (the drain path); once the client reads, every event arrives, in order."""
    import socket
    import threading
    import time

    import uvicorn

    from tests.serving import free_port

    n, pad = 600, b"x" * 16_000  # ~10 MB: more than loopback's socket buffers hold
    suspended = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        done = asyncio.Event()

        async def body():
            await done.wait()
            yield b"data: end\n\n"

        response = EventStream(body())

        async def writer():  # as the router's reader does: plain calls from another task, one per "step"
            await asyncio.sleep(0.05)
            for i in range(n):
                response.write(b"data: %d %s\n\n" % (i, pad))
                if response._draining is not None and not suspended:
                    suspended.append(i)
                await asyncio.sleep(0)
            done.set()

        asyncio.ensure_future(writer())
        await response(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.5)  # not reading: the server's buffers fill
            s.settimeout(30)
            data = bytearray()
            while not data.endswith(b"0\r\n\r\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        events = [line for line in bytes(data).split(b"\n") if line.startswith(b"data: ")]
        assert suspended, "the server never applied back-pressure: the test did not test the drain path"
        assert [e.split(b" ")[1] for e in events] == [b"%d" % i for i in range(n)] + [b"end"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_router_writes_the_steps_one_reader_turn_reads_as_one_event_per_stream():
    """A real Router and a stand-in worker on real sockets: steps that arrive one per reader turn go out one event
    each; steps that pile up while the router is busy (its loop blocked here) go out as one event per stream, with
    every token and its text in order, and a final step read in the same turn still comes after them."""
    import time

    import zmq

    from tokenworks.codec import Codec
    from tokenworks.model.weights import load_tokenizer_files
    from tokenworks.router.router import Router
    from tokenworks.sampling_params import SamplingParams
    from tokenworks.tokenizer import Tokenizer
    from tokenworks.worker import protocol as P

    files = load_tokenizer_files(None)
    tok = Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)
    words = tok.encode(" one two three four five six seven eight nine", add_special_tokens=False)
    assert len(words) == 9

    async def main():
        router = Router(block_size=16, local_prefill_threshold=16, tokenizer=tok)
        router.start()
        ctx = zmq.Context.instance()
        push, commands = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for s in (push, commands):
            s.setsockopt(zmq.LINGER, 0)
        port = commands.bind_to_random_port("tcp://127.0.0.1")
        push.connect(router.events_endpoint)
        enc, dec = Codec(P.FromWorker), Codec(P.ToWorker)
        router.expect("w0")
        push.send(enc.encode(P.Ready("w0", "both", 1, "m", f"tcp://127.0.0.1:{port}", 256, 16, 100, None, [0], 0.1)))
        while "w0" not in router.workers:
            await asyncio.sleep(0.01)

        def step(*outs: tuple[str, int, bool]) -> None:
            push.send(enc.encode(P.Outputs("w0", [P.Output(rid, [words[k]], done, "length" if done else None, 3, 0)
                                                  for rid, k, done in outs])))

        written: dict[str, list] = {"a": [], "b": []}
        yielded: dict[str, list] = {"a": [], "b": []}

        async def run(rid: str) -> None:
            params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
            async for d in router.generate(rid, [1, 2, 3], params, direct=lambda d: written[rid].append(d)):
                yielded[rid].append(d)

        tasks = [asyncio.ensure_future(run(rid)) for rid in "ab"]
        submitted = set()
        while len(submitted) < 2:
            while not commands.poll(0):
                await asyncio.sleep(0.01)
            submitted.add(dec.decode(commands.recv()).request_id)
        step(("a", 0, False), ("b", 0, False))  # first tokens: through each request's task
        for k in (1, 2):  # one step per reader turn: one event each
            await asyncio.sleep(0.05)
            step(("a", k, False), ("b", k, False))
        await asyncio.sleep(0.05)
        assert [len(d.token_ids) for d in written["a"]] == [1, 1]
        for k in (3, 4, 5):  # the router is busy while three steps come: one event each for all three
            step(("a", k, False), ("b", k, False))
        step(("b", 6, False))
        time.sleep(0.2)  # blocks the loop, as a busy router would be
        await asyncio.sleep(0.05)
        assert [d.token_ids for d in written["a"][2:]] == [words[3:6]]
        assert [d.token_ids for d in written["b"][2:]] == [words[3:7]]
        step(("a", 6, False), ("b", 7, False))  # read in one turn with each request's last step
        step(("a", 7, False), ("b", 8, True))
        step(("a", 8, True))
        time.sleep(0.2)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for rid in "ab":
            deltas = yielded[rid][:1] + written[rid] + yielded[rid][1:]  # as the client gets them
            assert [t for d in deltas for t in d.token_ids] == words
            assert "".join(d.text for d in deltas) == " one two three four five six seven eight nine"
            assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
            assert len(yielded[rid]) == 2  # the first token and the last went through the task
        assert [d.token_ids for d in written["a"][3:]] == [words[6:8]]
        assert [d.token_ids for d in written["b"][3:]] == [words[7:8]]
        assert not router.streams
        push.close(0)
        commands.close(0)
        router.close()

    asyncio.run(main())
