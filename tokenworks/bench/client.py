"""One benchmark request over streaming HTTP, timed token by token.

The client is aiohttp's: on a machine shared with the server under test, the load generator's own CPU is taken
from the server, and httpx cost 210-270 µs of CPU per streamed token at 64 streams (1.5-2 ms at one) where
this client costs about 85 (0.5 ms at one), against a bare uvicorn stream (`benchmarks/bare_sse.py`); on uvloop
(``loadgen.drive``) 50-53 against the same stream at 20 ms steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import msgspec

from tokenworks.bench.workloads import BenchRequest


_decode = msgspec.json.Decoder().decode


@dataclass
class RequestResult:
    index: int
    scheduled: float  # seconds from the run's start when it was meant to be sent
    start: float  # seconds from the run's start when it was sent
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server says it
    error: str | None = None
    error_after: float | None = None  # seconds from sending to the error (a 429's answer time, say)
    retry_after: float | None = None  # a refusal's Retry-After, in seconds (429 and 503 answers that give one)
    token_times: list[float] = field(default_factory=list)  # seconds from the run's start

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


async def send(client: aiohttp.ClientSession, base_url: str, api: str, model: str | None, req: BenchRequest,
               index: int, t0: float, scheduled: float, timeout: float, headers: dict | None = None) -> RequestResult:
    """Stream one request; every failure is recorded on the result (with when it came), never raised."""
    res = await _send(client, base_url, api, model, req, index, t0, scheduled, timeout, headers)
    if res.error is not None:
        res.error_after = time.perf_counter() - t0 - res.start
    return res


async def _send(client: aiohttp.ClientSession, base_url: str, api: str, model: str | None, req: BenchRequest,
                index: int, t0: float, scheduled: float, timeout: float, headers: dict | None) -> RequestResult:
    body: dict = {"max_tokens": req.max_tokens, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": 0.0, "ignore_eos": True}
    if model:
        body["model"] = model
    if api == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = req.prompt
        path = "/v1/completions"
    start = time.perf_counter()
    res = RequestResult(index=index, scheduled=scheduled, start=start - t0)
    last = None
    chunks = 0
    done = False
    try:
        async with client.post(base_url.rstrip("/") + path, json=body, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")[:300]
                res.error = f"HTTP {r.status}: {text}"
                try:
                    res.retry_after = float(r.headers["Retry-After"])
                except (KeyError, ValueError):
                    pass
                return res
            pending = b""
            async for data in r.content.iter_any():
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        msg = _decode(payload)
                    except msgspec.DecodeError:
                        msg = None
                    if not isinstance(msg, dict):
                        res.error = f"bad SSE data: {payload[:100].decode(errors='replace')}"
                        return res
                    if "error" in msg:
                        res.error = f"stream error: {msg['error']}"
                        return res
                    if msg.get("usage"):
                        usage = msg["usage"]
                        res.prompt_tokens = usage.get("prompt_tokens", 0)
                        res.output_tokens = usage.get("completion_tokens", 0)
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                        res.cached_tokens = cached if isinstance(cached, int) else None
                    for c in msg.get("choices") or []:
                        text = c.get("text") if api != "chat" else (c.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if last is None:
                                res.ttft = now - start
                            else:
                                res.itls.append(now - last)
                            res.token_times.append(now - t0)
                            last = now
                            chunks += 1
                if done:
                    break
            end = time.perf_counter()
            if done:
                # The response's end (the chunked body's last chunk) may still be on its way: read it, so that the
                # connection goes back to the pool, as real clients' (openai's) do, instead of being closed (the
                # server would pay a new connection for nearly every request). A failure here costs the
                # connection only: the stream was whole.
                with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
                    await r.content.read()
    except asyncio.TimeoutError:  # aiohttp's socket timeouts are TimeoutErrors too
        res.error = f"timed out after {timeout:.0f}s"
        return res
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not done:
        res.error = "stream closed before [DONE]"
        return res
    if res.ttft is None:
        res.error = "no tokens received"
        return res
    res.e2e = end - start
    if not res.output_tokens:
        res.output_tokens = chunks
    return res
