"""A stub OpenAI server whose timings the test controls: first token after `ttft`, then one token every `itl`.

With `serial=True` it serves one request at a time (the others queue), so the
capacity is known. Prompts containing FAIL500 get a 500; BUSY a 429 with
Retry-After: 1; CLOSE closes the stream after two tokens without [DONE]; CACHED says half its words (rounded
down) were found in the prefix cache (``usage.prompt_tokens_details.cached_tokens``; other prompts say nothing).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.serving import free_port


class StubServer:
    def __init__(self, ttft: float, itl: float, serial: bool = False) -> None:
        self.ttft, self.itl = ttft, itl
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_ports: set[int] = set()  # one per connection the clients opened
        app = FastAPI()
        lock = asyncio.Lock() if serial else None

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.client_ports.add(request.client.port)
            body = await request.json()
            prompt, n = body["prompt"], body["max_tokens"]
            if "FAIL500" in prompt:
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
            if "BUSY" in prompt:
                return JSONResponse({"error": {"message": "server is at capacity; retry in 1s", "type": "rate_limit_error"}},
                                    status_code=429, headers={"Retry-After": "1"})

            async def produce():
                await asyncio.sleep(self.ttft)
                for i in range(n):
                    if i:
                        await asyncio.sleep(self.itl)
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' t{i}', 'finish_reason': None}]})}\n\n"
                    if "CLOSE" in prompt and i == 1:
                        return
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": 0}
                if "CACHED" in prompt:
                    usage["prompt_tokens_details"] = {"cached_tokens": len(prompt.split()) // 2}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                await asyncio.sleep(0.005)  # the body's end in a write of its own, as the router's often is

            async def stream():
                if lock is None:
                    async for x in produce():
                        yield x
                else:
                    async with lock:
                        async for x in produce():
                            yield x

            return StreamingResponse(stream(), media_type="text/event-stream")

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stub server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
