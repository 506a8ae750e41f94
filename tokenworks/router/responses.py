"""OpenAI's Responses API (``POST /v1/responses``) over the chat path: a request becomes a chat request (its
``input`` items messages, ``instructions`` a system message first, ``text.format`` a response_format, its flat
function tools chat tools), runs as one, and its text and calls come back as Responses output items: a
``message`` with ``output_text``, and a ``function_call`` item per call (router/tools.py reads them).

Streamed, the answer is Responses' semantic events, each ``event: <type>`` with a ``sequence_number``:
response.created, response.in_progress, then per output item output_item.added, its content_part.added /
output_text.delta / output_text.done / content_part.done (a message) or function_call_arguments.delta / .done (a
call), output_item.done, and last response.completed (or response.incomplete when max_output_tokens cut it).

Not served (400 naming the field): ``previous_response_id`` and ``conversation`` (nothing is stored: send the
whole input each time), and tools other than functions (web search, file search...).
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from tokenworks.router.schema import ChatCompletionRequest, MAX_TOOLS


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_schema" | "json_object", ...}}
    previous_response_id: str | None = None
    conversation: Any = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request this one is. Raises ValueError (``param`` as its second argument) for what cannot be."""
        if self.previous_response_id is not None:
            raise ValueError("responses are not stored here: send the whole conversation as input",
                             "previous_response_id")
        if self.conversation is not None:
            raise ValueError("conversations are not stored here: send the whole conversation as input",
                             "conversation")
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + _messages(
            self.input)
        tools = None
        if self.tools:
            tools = []
            for t in self.tools:
                if t.get("type") != "function":
                    raise ValueError(f"tools of type {t.get('type')!r} are not served here, only functions", "tools")
                tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                                 "strict") if t.get(k) is not None}})
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise ValueError("tool_choice must be none, auto, required or {type: function, name: ...}",
                                 "tool_choice")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        fmt = (self.text or {}).get("format")
        response_format = None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            response_format = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"),
                                                                     "schema": fmt.get("schema", {})}}
        elif isinstance(fmt, dict) and fmt.get("type") in ("json_object", "text"):
            response_format = {"type": fmt["type"]}
        elif fmt is not None:
            raise ValueError("text.format must be an object of type text, json_object or json_schema", "text")
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream, "tools": tools,
            "tool_choice": choice, "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": response_format, "user": self.user})


def _text(content: Any) -> str:
    """An input message's text: a string, or its parts' (input_text, output_text, text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("a message's content must be a string or a list of text parts", "input")
    out = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content parts of type {kind!r} are not served here, only text", "input")
        out.append(str(part.get("text", "")))
    return "".join(out)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from Responses input items: messages; function_call items (consecutive ones one assistant
    message with several calls); function_call_output items as tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"an input message's role must be user, system, developer or assistant, not "
                                 f"{item.get('role')!r}", "input")
            messages.append({"role": item["role"], "content": _text(item.get("content", ""))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(output)})
        else:
            raise ValueError(f"input items of type {kind!r} are not served here", "input")
    if not messages:
        raise ValueError("input has no messages", "input")
    return messages


_encode = msgspec.json.Encoder()


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponseWriter:
    """One response's object and, streamed, its events, from chat-style deltas: ``{"content": text}`` and
    ``{"tool_calls": [{"index", "id"?, "function": {"name"?, "arguments"}}]}`` (as router/tools.py writes them)."""

    def __init__(self, body: ResponsesRequest, rid: str, created: int, model: str) -> None:
        self.body, self.rid, self.created, self.model = body, rid, created, model
        self.items: list[dict[str, Any]] = []  # the output items, as they stand
        self.open: dict[str, Any] | None = None  # the item being written (streamed)
        self.calls: dict[int, dict[str, Any]] = {}  # a call's index in the chat deltas -> its item
        self.sequence = 0

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        return {"id": self.rid, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": self.items, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": b.metadata,
                "parallel_tool_calls": b.parallel_tool_calls, "temperature": b.temperature, "top_p": b.top_p,
                "tool_choice": b.tool_choice or ("auto" if b.tools else "none"), "tools": b.tools or [],
                "text": b.text or {"format": {"type": "text"}}, "usage": usage}

    @staticmethod
    def usage(prompt_tokens: int, cached: int, completion_tokens: int) -> dict[str, Any]:
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def status(finish_reason: str | None) -> str:
        return "incomplete" if finish_reason == "length" else "completed"

    def whole(self, message: dict[str, Any], finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        """The unstreamed response from a chat message (router/tools.py's ``reply``, or plain content)."""
        status = self.status(finish_reason)
        if message.get("content"):
            self.items.append(self._message(status, message["content"]))
        for call in message.get("tool_calls", ()):
            self.items.append(self._call(call["id"], call["function"]["name"], call["function"]["arguments"]))
        return self.response(status, usage)

    def _message(self, status: str, text: str) -> dict[str, Any]:
        return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
                "status": "completed"}

    # -- streamed ---------------------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode.encode(payload) + b"\n\n"

    def start(self) -> list[bytes]:
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def _close(self, status: str) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = self.items.index(item)
        if item["type"] == "message":
            part = item["content"][0]
            out = [self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                               text=part["text"], logprobs=[]),
                   self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                               part=part)]
        else:
            out = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                               arguments=item["arguments"], name=item["name"])]
        item["status"] = status if item["type"] == "message" else "completed"
        return out + [self._event("response.output_item.done", output_index=at, item=item)]

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        """The events of one chat-style delta."""
        out: list[bytes] = []
        if delta.get("content"):
            if self.open is None or self.open["type"] != "message":
                out += self._close("completed")
                item = self._message("in_progress", "")
                part = dict(item["content"][0])
                self.items.append(item)
                self.open = item
                at = len(self.items) - 1
                out += [self._event("response.output_item.added", output_index=at,
                                    item={**item, "content": []}),
                        self._event("response.content_part.added", item_id=item["id"], output_index=at,
                                    content_index=0, part=part)]
            item = self.open
            item["content"][0]["text"] += delta["content"]
            out.append(self._event("response.output_text.delta", item_id=item["id"], output_index=self.items.index(item),
                                   content_index=0, delta=delta["content"], logprobs=[]))
        for entry in delta.get("tool_calls", ()):
            item = self.calls.get(entry["index"])
            if item is None:
                out += self._close("completed")
                item = self._call(entry["id"], entry["function"]["name"], "")
                item["status"] = "in_progress"
                self.calls[entry["index"]] = item
                self.items.append(item)
                self.open = item
                out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                       item=dict(item)))
            arguments = entry["function"].get("arguments") or ""
            if arguments:
                item["arguments"] += arguments
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=self.items.index(item), delta=arguments))
        return out

    def end(self, finish_reason: str | None, usage: dict[str, Any]) -> list[bytes]:
        status = self.status(finish_reason)
        out = self._close(status)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + [self._event(kind, response=self.response(status, usage))]

    def failed(self, message: str, code: str | None) -> bytes:
        failed = self.response("failed")
        failed["error"] = {"message": message, "code": code or "server_error"}
        return self._event("response.failed", response=failed)

