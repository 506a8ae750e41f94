"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenworks.router.responses import ResponsesRequest, ResponseWriter
from tokenworks.router.router import Delta, RequestFailed, Router, WorkerUnavailable
from tokenworks.router.schema import (MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      TokenizeRequest)
from tokenworks.router.sse import RAW_SEND, EventStream
from tokenworks.router.tools import ToolError, ToolUse, history
from tokenworks.sampling_params import SamplingParams
from tokenworks.structured_output import check_grammar, grammar_for
from tokenworks.tokenizer import Tokenizer

MAX_BODY_BYTES = 8 * 2**20
FASTAPI_UNREADABLE_BODY = "There was an error parsing the body"  # FastAPI's words for a body its JSON reader raised on
log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


_encode = msgspec.json.Encoder()


def sse(payload: dict) -> bytes:
    """One server-sent event carrying ``payload`` as JSON (UTF-8, as OpenAI's streams are)."""
    return b"data: " + _encode.encode(payload) + b"\n\n"


def chat_logprobs(entries) -> dict[str, Any]:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for _, t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries, echoed: list[tuple[str, Any]] = ()) -> dict[str, Any]:
    """A completion choice's logprobs; ``echoed``: (token, entry or None) per prompt token first (echo: the
    prompt's first token has none to give)."""
    return {"tokens": [t for t, _ in echoed] + [e.token for e in entries],
            "token_logprobs": [e and e.logprob for _, e in echoed] + [e.logprob for e in entries],
            "top_logprobs": [e and {t: lp for _, t, lp in e.top} for _, e in echoed]
                            + [{t: lp for _, t, lp in e.top} for e in entries], "text_offset": []}


class ChunkEncoder:
    """The server-sent events of one streamed response. A plain token's event (no logprobs, not the chat role
    event) is spliced from bytes encoded once per response around the token's text and finish reason: the same
    JSON as the dict path below, at a fraction of the cost, since it is built once per token and stream."""

    def __init__(self, kind: str, rid: str, created: int, model: str, include_usage: bool, want_logprobs: bool):
        self.kind, self.want_logprobs = kind, want_logprobs
        self.head = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": created, "model": model}
        self.include_usage = include_usage
        enc = _encode.encode
        self._open = (b'data: {"id":' + enc(rid) + b',"object":' + enc(self.head["object"]) + b',"created":'
                      + enc(created) + b',"model":' + enc(model) + b',"choices":[{"index":')
        self._text = b',"delta":{"content":' if kind == "chat" else b',"text":'
        self._reason = b'},"finish_reason":' if kind == "chat" else b',"finish_reason":'
        self._close = b',"logprobs":null}]' + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def chunk(self, i: int, d: Delta | None, role: bool = False) -> bytes:
        if not role and not self.want_logprobs:
            enc = _encode.encode
            return b"".join((self._open, b"%d" % i, self._text, enc(d.text), self._reason, enc(d.finish_reason),
                             self._close))
        return self.chunk_from_dict(i, d, role)

    def chunk_from_dict(self, i: int, d: Delta | None, role: bool = False) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": d.text}
            c = {"index": i, "delta": delta, "finish_reason": None if role else d.finish_reason,
                 "logprobs": chat_logprobs(d.logprobs) if (self.want_logprobs and not role) else None}
        else:
            c = {"index": i, "text": d.text, "finish_reason": d.finish_reason,
                 "logprobs": completion_logprobs(d.logprobs) if self.want_logprobs else None}
        return self._event(c)

    def delta_chunk(self, i: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        """A chat chunk with the given delta (tool calling's: router/tools.py)."""
        return self._event({"index": i, "delta": delta, "finish_reason": finish_reason, "logprobs": None})

    def _event(self, choice: dict[str, Any]) -> bytes:
        payload = {**self.head, "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)


class ClientGone(Exception):
    pass


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    """The items of ``first``, then those of ``rest``."""
    for item in first:
        yield item
    async for item in rest:
        yield item


async def until_disconnect(awaitable, http: Request):
    """Await ``awaitable`` unless the client disconnects first; then cancel it (which aborts the request
    on its workers) and raise ClientGone. Before a response starts nobody else watches the connection: the
    request's body has been read, so the next ASGI message is the disconnect, and waiting for it costs nothing
    (Starlette's is_disconnected() polled every 0.2 s, building a task's repr each time)."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(http.receive())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done() and not gone.cancelled() and gone.exception() is None \
                and gone.result().get("type") == "http.disconnect":
            raise ClientGone
        return await task
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


class Gate:
    """ASGI middleware in front of every route: the API key on /v1/* and /admin/*, and 413 for bodies over
    ``limit`` bytes whether or not they declare a length. Pure ASGI (not BaseHTTPMiddleware, which hides client
    disconnects from the handlers)."""

    def __init__(self, app, limit: int, expected_auth: bytes | None) -> None:
        self.app, self.limit, self.expected_auth = app, limit, expected_auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected_auth is not None and scope["path"].startswith(("/v1/", "/admin/")):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected_auth):
                response = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                          "authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                response = error_response(413, f"request body over {self.limit} bytes", "invalid_request_error")
                return await response(scope, receive, send)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if (b"\\ud" in body or b"\\uD" in body) and json_body(scope):  # a surrogate's escape: maybe a lone one
            where = lone_surrogate(body)
            if where is not None:
                response = error_response(400, f"{where or 'body'}: a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                               "not in a pair) is not a Unicode character", "invalid_request_error",
                                          where or None)
                return await response(scope, receive, send)
        await self.app(scope, replaying(body, receive), send)


def lone_surrogate(body: bytes) -> str | None:
    """Where a JSON body holds a string with a lone surrogate, as a dotted path ("" for the body itself), or None
    (none, or not JSON: FastAPI says so). Python's JSON reader lets "\\udcff" through as a character that nothing
    can encode: the tokenizer and the workers' messages would fail on it as a server error."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    todo: list[tuple[Any, str]] = [(doc, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                todo.append((v, f"{path}.{k}" if path else str(k)))
                todo.append((k, path))  # a key (logit_bias's) counts as its object's: looked at before its value
        elif isinstance(value, list):
            todo.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path
    return None


def replaying(body: bytes, receive):
    """An ASGI ``receive`` whose first message is the whole ``body``; later calls go to ``receive`` (where a
    stream's handler waits for the client's disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def api_error_response(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


def unexpected_response(e: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


def json_body(scope) -> bool:
    """Whether FastAPI would read the body as JSON: no content type, or application/json or application/*+json."""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return True


class _App(FastAPI):
    """FastAPI behind ``Gate`` (the API key and the body limit, for every route), with two additions:

    - the server's own ``send`` kept in the scope: a stream's token events (router/sse.py) go to it straight, not
      through the middleware's send wrappers, which only watch for the response's start;
    - the generation endpoints (``fast_posts``: path -> (request model, handler)) called straight when their
      body is valid: FastAPI's routing, dependency solving and middleware cost about 0.6 ms a request
      (`benchmarks/router_path.py --output-len 1 --requests 2000`: 1.92 -> 1.33 ms of router CPU a request).
      The body is validated as FastAPI would (``json.loads``, then the model in Python mode); a body that fails,
      or is not JSON, goes through FastAPI with it replayed, so that every error keeps FastAPI's path and form.
    """

    def __init__(self, *, gate_limit: int, expected_auth: bytes | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = Gate(self._dispatch, gate_limit, expected_auth)
        self.fast_posts: dict[str, tuple[type, Callable[[Any, Request], Awaitable[Response]]]] = {}

    async def __call__(self, scope, receive, send) -> None:
        scope[RAW_SEND] = send
        await self.gate(scope, receive, send)

    async def _dispatch(self, scope, receive, send) -> None:
        route = self.fast_posts.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await super().__call__(scope, receive, send)
        body = (await receive()).get("body", b"")  # Gate gives the whole body in one message
        model, handler = route
        try:
            if not json_body(scope):
                raise ValueError("not JSON")
            request = model.model_validate(json.loads(body))
        except Exception:  # noqa: BLE001 - FastAPI reports it, in its own words
            return await super().__call__(scope, replaying(body, receive), send)
        try:
            response = await handler(request, Request(scope, receive))
        except APIError as e:
            response = api_error_response(e)
        except Exception as e:  # noqa: BLE001 - as the app's handler for Exception does, and logged
            log.exception("error in %s", scope["path"])
            response = unexpected_response(e)
        await response(scope, receive, send)


def create_app(router: Router, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               launcher=None) -> FastAPI:
    """The OpenAI API over ``router``; with a ``launcher``, the admin API too (router/admin.py)."""
    from tokenworks.router.admin import add_admin_routes

    expected_auth = f"Bearer {api_key}".encode() if api_key else None
    app = _App(title="tokenworks", version="0.1.0", gate_limit=MAX_BODY_BYTES, expected_auth=expected_auth)
    app.state.router = router

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # its loc is the character where reading stopped, not a field
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '?')} "
                                       f"(at character {first['loc'][-1]})", "invalid_request_error")
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
            msg = "request body must be a JSON object (content-type: application/json)"
        return error_response(400, f"{loc}: {msg}" if loc else msg, "invalid_request_error", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404 and e.detail == "Not Found":  # routing found no such path
            served = sorted({r.path for r in app.routes if getattr(r, "path", "").startswith("/v1/")})
            return error_response(404, f"{request.url.path} is not served here; the OpenAI API here is "
                                       f"{', '.join(served)}", "invalid_request_error")
        if e.status_code == 400 and e.detail == FASTAPI_UNREADABLE_BODY:
            return error_response(400, "request body could not be read as JSON: it is not UTF-8, or is nested too "
                                       "deeply", "invalid_request_error")
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return unexpected_response(e)

    add_admin_routes(app, launcher, api_key, APIError)

    @app.get("/health")
    async def health() -> Response:
        views = router.view()
        if not any(v.alive and v.role in ("decode", "both") for v in views):
            return error_response(503, "no decode-capable worker is alive", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tokenworks",
                                            "max_model_len": router.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """A prompt's token ids as a completion request would send them, or chat messages' as a chat request would
        (the template applied; tools not offered); with the model's context length, as vLLM answers."""
        check_model(body.model)
        if body.messages is not None:
            try:
                ids = tokenizer.encode_chat(history(body.messages, tokenizer.template_takes_tools),
                                            add_generation_prompt=body.add_generation_prompt)
            except Exception as e:  # noqa: BLE001 - template errors are the caller's input
                raise APIError(400, f"could not apply the chat template: {e}", param="messages") from e
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": router.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """Token ids back to text (special tokens kept, as /tokenize's ids of a chat hold them)."""
        check_model(body.model)
        if any(not (0 <= t < tokenizer.vocab_size) for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/debug/workers")
    async def workers() -> dict[str, Any]:
        """Per-worker state from the last heartbeat; `idle` means every KV block is back in the pool."""
        router.view()
        out = {}
        for wid, h in router.workers.items():
            s = h.stats
            out[wid] = {
                "role": h.ready.role, "pid": h.ready.pid, "cpus": h.ready.cpus, "alive": h.view.alive,
                "inflight": h.view.inflight, "warmup_seconds": h.ready.warmup_seconds,
                **({} if s is None else {
                    "step_ms": s.step_ms, "steps": s.steps, "busy_seconds": s.busy_seconds,
                    "running": s.num_running, "waiting": s.num_waiting, "waiting_for_kv": s.num_waiting_for_kv,
                    "held": s.num_held, "blocks_used": s.blocks_used, "blocks_total": s.blocks_total,
                    "blocks_cached": s.blocks_cached, "expired_leases": s.expired_leases, "idle": s.idle,
                    "host_blocks_cached": s.host_blocks_cached, "host_blocks_restored": s.host_blocks_restored,
                    "draft_tokens": s.draft_tokens, "accepted_draft_tokens": s.accepted_draft_tokens}),
            }
        return {"workers": out}

    @app.get("/debug/routing")
    async def routing() -> dict[str, Any]:
        """The latest placements (worker, reason, prefix hit, every candidate's cost), the KV index's size, and each
        worker's load as the router counts it."""
        index = router.kv_index
        return {
            "routing": router.policy.routing, "overlap_weight": router.policy.overlap_weight,
            "kv_index": {"blocks": index.num_entries, "bytes": index.nbytes, "events": index.num_events,
                         "overflows": index.num_overflows,
                         "per_worker": {w: len(b) for w, b in index.blocks.items()},
                         "host_per_worker": {w: len(b) for w, b in index.host.items()}},
            "workers": {wid: {"active_tokens": h.view.active_tokens, "queued_prefill_tokens": h.view.queued_prefill_tokens,
                              "prefill_tokens_per_s": round(h.view.rates.tokens.rate, 1),
                              "first_tokens_per_s": round(h.view.rates.requests.rate, 2), "inflight": h.view.inflight}
                        for wid, h in router.workers.items()},
            "decisions": list(router.decisions),
        }

    def check_model(name: str | None) -> None:
        if name is not None and name not in (model_name, "default"):
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def unsupported(param: str, what: str) -> APIError:
        return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")

    def sampling(body, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                 prompt_logprobs: int | None = None, tool_grammar: str | None = None) -> SamplingParams:
        room = router.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context is {router.max_model_len}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif prompt_len + max_tokens > router.max_model_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                                f"of {router.max_model_len}", param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        bias = []
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if key.strip().isdigit() else -1
            if not 0 <= token < tokenizer.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {tokenizer.vocab_size}); got {key!r}",
                               param="logit_bias")
            bias.append((token, value))
        try:
            grammar = grammar_for(body.response_format, json_schema=body.guided_json, regex=body.guided_regex,
                                  choice=body.guided_choice, grammar=body.guided_grammar)
            if grammar is not None:
                check_grammar(grammar)
        except ValueError as e:
            fields = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
            raise APIError(400, str(e), param=next((f for f in fields if getattr(body, f) is not None), None)) from e
        if tool_grammar is not None:
            if grammar is not None:
                raise APIError(400, "a required or named tool_choice holds the reply to the tools' schemas: give no "
                                    "response_format or guided_* with it", param="tool_choice")
            grammar = tool_grammar
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, seed=body.seed, stop=tuple(stop),
                ignore_eos=body.ignore_eos, logprobs=logprobs, logit_bias=tuple(bias), grammar=grammar,
                prompt_logprobs=prompt_logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else None) from e

    def seeded(params: SamplingParams, i: int) -> SamplingParams:
        if i == 0 or params.seed is None:
            return params
        from dataclasses import replace

        return replace(params, seed=(params.seed + i) % 2**63)

    async def run_choices(jobs: list[tuple[list[int], SamplingParams]], n: int, prefix: str, direct=None
                          ) -> AsyncIterator[tuple[int, Delta]]:
        """Merge the streams of n choices for each (prompt, params) job, choice j of job i at index i n + j; cancel
        them all if the consumer leaves. With one choice in all, ``direct`` (see Router.generate) takes the
        deltas of steady decoding."""
        total = len(jobs) * n
        if total == 1:
            prompt, params = jobs[0]
            async for d in router.generate(router.new_request_id(prefix), prompt, params, direct):
                yield 0, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            prompt, params = jobs[i // n]
            try:
                async for d in router.generate(router.new_request_id(prefix), prompt, seeded(params, i % n)):
                    await queue.put((i, d))
            except Exception as e:  # noqa: BLE001 - surfaced to the consumer below
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(total)]
        try:
            done = 0
            while done < total:
                i, item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def translate(e: Exception) -> APIError:
        if isinstance(e, WorkerUnavailable):
            return APIError(503, str(e), "server_error", code="service_unavailable", headers={"Retry-After": "2"})
        if isinstance(e, RequestFailed):
            return APIError(e.status, str(e))
        return APIError(500, f"internal error: {type(e).__name__}", "server_error")

    async def first_of(gen: AsyncIterator, http: Request):
        """A stream's first item, awaited before answering so that a request no worker can take gets a real status
        code (None if it has none). Raises ClientGone, or the failure as an APIError; ``gen`` is closed then."""
        try:
            return await until_disconnect(gen.__anext__(), http)
        except StopAsyncIteration:
            return None
        except ClientGone:
            await gen.aclose()
            raise
        except Exception as e:  # noqa: BLE001
            await gen.aclose()
            raise translate(e) from e

    def admit(prompt: list[int], n: int) -> None:
        """429 with Retry-After when the fleet cannot take ``n`` sequences of this prompt now."""
        retry_after = router.admission_check(prompt, n)
        if retry_after is not None:
            raise APIError(429, f"server is at capacity; retry in {retry_after:.0f}s", "rate_limit_error",
                           code="server_overloaded", headers={"Retry-After": str(max(1, round(retry_after)))})

    async def respond(kind: str, body, jobs: list[tuple[list[int], SamplingParams]], http: Request,
                      echo: list[str] | None = None, score_only: bool = False, tools: ToolUse | None = None
                      ) -> Response:
        """The response to ``jobs``: (prompt, params) pairs, one for a chat or a completion, one per prompt of a
        batched completion; body.n choices each. ``echo``: each job's prompt text, put before its choices' text
        (with the prompt's logprobs, where asked). ``score_only`` (echo with max_tokens 0, unstreamed): the one
        token generated is left out. ``tools``: a chat's tool calling, whose calls are read from each choice's
        text."""
        admit(max((prompt for prompt, _ in jobs), key=len), body.n * len(jobs))
        created = int(time.time())
        num_choices = body.n * len(jobs)
        params = jobs[0][1]

        cached = [0] * len(jobs)  # prompt tokens each job's first choice found in a prefix cache
        prompt_tokens = sum(len(prompt) for prompt, _ in jobs)

        def usage_of(completion_tokens: int) -> dict[str, Any]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": sum(cached)}}

        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{router.new_request_id('r')}"
        want_logprobs = params.logprobs is not None
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.stream:
            texts = [""] * num_choices
            reasons: list[str | None] = [None] * num_choices
            lps: list[list] = [[] for _ in range(num_choices)]
            prompt_lps: list[list | None] = [None] * num_choices
            completion_tokens = 0
            async def collect() -> int:
                tokens = 0
                async for i, d in run_choices(jobs, body.n, rid):
                    if i % body.n == 0 and d.num_cached_tokens:
                        cached[i // body.n] = d.num_cached_tokens
                    texts[i] += d.text
                    tokens += len(d.token_ids)
                    lps[i].extend(d.logprobs)
                    if d.prompt_logprobs is not None:
                        prompt_lps[i] = d.prompt_logprobs
                    if d.finished:
                        reasons[i] = d.finish_reason
                return tokens

            try:
                completion_tokens = await until_disconnect(collect(), http)
            except ClientGone:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001
                raise translate(e) from e
            if score_only:
                texts, lps, completion_tokens = [""] * num_choices, [[] for _ in range(num_choices)], 0
            choices = []
            for i in range(num_choices):
                if kind == "chat":
                    message, reason = ({"role": "assistant", "content": texts[i]}, reasons[i]) if tools is None \
                        else tools.reply(texts[i], reasons[i])
                    c = {"index": i, "message": message, "finish_reason": reason,
                         "logprobs": chat_logprobs(lps[i]) if want_logprobs else None}
                else:
                    echoed = []
                    if echo is not None and want_logprobs:
                        ids, got = jobs[i // body.n][0], prompt_lps[i] or []
                        echoed = [(tokenizer.id_to_token(t) or "", got[k] if k < len(got) else None)
                                  for k, t in enumerate(ids)]
                    c = {"index": i, "text": (echo[i // body.n] if echo is not None else "") + texts[i],
                         "finish_reason": reasons[i],
                         "logprobs": completion_logprobs(lps[i], echoed) if want_logprobs else None}
                choices.append(c)
            usage = usage_of(completion_tokens)
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                                 "choices": choices, "usage": usage})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        encoder = ChunkEncoder(kind, rid, created, model_name, include_usage, want_logprobs)
        chunk = encoder.chunk
        completion_tokens = [0]
        response: EventStream | None = None
        calls = [tools.stream() for _ in range(num_choices)] if tools is not None else None

        def counted(i: int, d: Delta) -> bytes:
            completion_tokens[0] += len(d.token_ids)
            if calls is None:
                return chunk(i, d)
            deltas, reason = calls[i].feed(d.text), None
            if d.finished:
                last, reason = calls[i].end(d.finish_reason)
                deltas = deltas + last or [{}]
            return b"".join(encoder.delta_chunk(i, delta, reason if k == len(deltas) - 1 else None)
                            for k, delta in enumerate(deltas))

        def direct(d: Delta) -> None:  # a token of steady decoding, from the router's reader (router/stream.py)
            response.write(counted(0, d))

        gen = run_choices(jobs, body.n, rid, direct if calls is None else None)
        try:
            first = await first_of(gen, http)
        except ClientGone:
            return Response(status_code=499)

        async def events() -> AsyncIterator[bytes]:
            try:
                if kind == "chat":
                    for i in range(num_choices):
                        yield chunk(i, None, role=True)
                for i in range(num_choices if echo is not None else 0):  # the prompt first (echo, no logprobs)
                    yield chunk(i, Delta([], echo[i // body.n], False, None, 0, []))
                if first is not None:
                    i, d = first
                    if i % body.n == 0 and d.num_cached_tokens:
                        cached[i // body.n] = d.num_cached_tokens
                    if event := counted(i, d):
                        yield event
                async for i, d in gen:
                    if i % body.n == 0 and d.num_cached_tokens:
                        cached[i // body.n] = d.num_cached_tokens
                    if event := counted(i, d):
                        yield event
                if include_usage:
                    usage = usage_of(completion_tokens[0])
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": [],
                               "usage": usage})
                yield b"data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
                err = translate(e)
                yield sse({"error": {"message": err.message, "type": err.type, "code": err.code}})
            finally:
                await gen.aclose()

        response = EventStream(events(), headers={"Cache-Control": "no-cache"})
        return response

    def prepare_chat(body: ChatCompletionRequest) -> tuple[list[int], SamplingParams, ToolUse | None]:
        """A chat request's prompt, its sampling parameters and its tool calling (None without)."""
        takes_tools = tokenizer.template_takes_tools
        messages, shown = history(body.messages, takes_tools), None
        try:
            tools = ToolUse.of([t.model_dump(exclude_none=True) for t in body.tools or ()],
                               body.tool_choice if isinstance(body.tool_choice, (str, type(None)))
                               else body.tool_choice.model_dump(), body.parallel_tool_calls)
            tool_grammar = tools.grammar() if tools is not None else None
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from e
        if tools is not None:
            if body.stream and body.logprobs:
                raise APIError(400, "logprobs with tool calling are answered unstreamed: drop stream", param="logprobs")
            messages, shown = tools.prompt(messages, takes_tools)
        try:
            prompt = tokenizer.encode_chat(messages, tools=shown)
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"could not apply the chat template: {e}", param="messages") from e
        top = body.top_logprobs if body.top_logprobs is not None else 0
        params = sampling(body, body.max_completion_tokens or body.max_tokens, len(prompt), top if body.logprobs else None,
                          tool_grammar=tool_grammar)
        return prompt, params, tools

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Response:
        check_model(body.model)
        prompt, params, tools = prepare_chat(body)
        return await respond("chat", body, [(prompt, params)], http, tools=tools)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, http: Request) -> Response:
        """OpenAI's Responses API, run as a chat (router/responses.py)."""
        check_model(body.model)
        try:
            chat_body = body.as_chat()
        except ValueError as e:
            raise APIError(400, e.args[0], param=e.args[1] if len(e.args) > 1 else None) from e
        except Exception as e:  # noqa: BLE001 - the translated request failed validation: the caller's input
            raise APIError(400, f"input: {e}", param="input") from e
        prompt, params, tools = prepare_chat(chat_body)
        admit(prompt, 1)
        writer = ResponseWriter(body, f"resp_{router.new_request_id('r')}", int(time.time()), model_name)
        stream = tools.stream() if tools is not None else None
        counts = {"tokens": 0, "cached": 0}

        def count(d: Delta) -> None:
            counts["tokens"] += len(d.token_ids)
            counts["cached"] = counts["cached"] or d.num_cached_tokens

        def deltas(d: Delta) -> list[dict[str, Any]]:  # chat-style, for ResponseWriter.delta
            count(d)
            return stream.feed(d.text) if stream is not None else ([{"content": d.text}] if d.text else [])

        def usage() -> dict[str, Any]:
            return ResponseWriter.usage(len(prompt), counts["cached"], counts["tokens"])

        gen = run_choices([(prompt, params)], 1, writer.rid)
        if not body.stream:
            async def collect() -> tuple[str, str | None]:
                text, reason = "", None
                async for _, d in gen:
                    count(d)
                    text += d.text
                    reason = d.finish_reason if d.finished else reason
                return text, reason

            try:
                text, reason = await until_disconnect(collect(), http)
            except ClientGone:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001
                raise translate(e) from e
            message, reason = tools.reply(text, reason) if tools is not None else ({"content": text}, reason)
            return JSONResponse(writer.whole(message, reason, usage()))
        try:
            first = await first_of(gen, http)
        except ClientGone:
            return Response(status_code=499)

        async def events() -> AsyncIterator[bytes]:
            try:
                for event in writer.start():
                    yield event
                reason = None
                pending = [first] if first is not None else []
                async for item in _chain(pending, gen):
                    _, d = item
                    for delta in deltas(d):
                        for event in writer.delta(delta):
                            yield event
                    if d.finished:
                        reason = d.finish_reason
                if stream is not None:
                    last, reason = stream.end(reason)
                    for delta in last:
                        for event in writer.delta(delta):
                            yield event
                for event in writer.end(reason, usage()):
                    yield event
            except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
                err = translate(e)
                yield writer.failed(err.message, err.code)
            finally:
                await gen.aclose()

        return EventStream(events(), headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        check_model(body.model)
        if body.suffix:
            raise unsupported("suffix", "suffix (insertion)")
        if body.best_of is not None and body.best_of != body.n:
            raise unsupported("best_of", "best_of other than n")
        p = body.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (list, str)) else [p]
        if len(batch) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
        if body.echo and body.stream and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is answered unstreamed: drop stream", param="echo")
        score_only = body.max_tokens == 0
        if score_only and (not body.echo or body.stream):
            raise APIError(400, "max_tokens 0 scores the prompt: it needs echo, unstreamed", param="max_tokens")
        jobs, echo = [], []
        for one in batch:
            if isinstance(one, str):
                prompt = tokenizer.encode(one)
            else:
                prompt = list(one)
                if any(not (0 <= t < tokenizer.vocab_size) for t in prompt):
                    raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            echo.append(one if isinstance(one, str) else tokenizer.decode(prompt, skip_special_tokens=False))
            max_tokens = 16 if body.max_tokens is None else max(body.max_tokens, 1)
            jobs.append((prompt, sampling(body, max_tokens, len(prompt), body.logprobs,
                                          body.logprobs if body.echo else None)))
        return await respond("completion", body, jobs, http, echo if body.echo else None, score_only)

    app.fast_posts = {"/v1/chat/completions": (ChatCompletionRequest, chat),
                      "/v1/completions": (CompletionRequest, completions),
                      "/v1/responses": (ResponsesRequest, responses)}
    return app
