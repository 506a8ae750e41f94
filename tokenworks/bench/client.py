"""One benchmark request over streaming HTTP, timed token by token."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from tokenworks.bench.workloads import BenchRequest


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
    error: str | None = None
    error_after: float | None = None  # seconds from sending to the error (a 429's answer time, say)
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


async def send(client: httpx.AsyncClient, base_url: str, api: str, model: str | None, req: BenchRequest,
               index: int, t0: float, scheduled: float, timeout: float, headers: dict | None = None) -> RequestResult:
    """Stream one request; every failure is recorded on the result (with when it came), never raised."""
    res = await _send(client, base_url, api, model, req, index, t0, scheduled, timeout, headers)
    if res.error is not None:
        res.error_after = time.perf_counter() - t0 - res.start
    return res


async def _send(client: httpx.AsyncClient, base_url: str, api: str, model: str | None, req: BenchRequest,
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
        async with client.stream("POST", base_url.rstrip("/") + path, json=body, timeout=timeout,
                                 headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {r.status_code}: {text}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    msg = json.loads(data)
                except json.JSONDecodeError:
                    res.error = f"bad SSE data: {data[:100]}"
                    return res
                if "error" in msg:
                    res.error = f"stream error: {msg['error']}"
                    return res
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
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
    except httpx.TimeoutException:
        res.error = f"timed out after {timeout:.0f}s"
        return res
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not done:
        res.error = "stream closed before [DONE]"
        return res
    if res.ttft is None:
        res.error = "no tokens received"
        return res
    res.e2e = time.perf_counter() - start
    if not res.output_tokens:
        res.output_tokens = chunks
    return res
