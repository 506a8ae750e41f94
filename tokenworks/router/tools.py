"""Tool calling (OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``) for any model with a chat template.

What the model is shown: where the chat template renders a ``tools`` list itself
(``Tokenizer.template_takes_tools``) it gets them; else a system message lists them as JSON and asks for calls
written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format Hermes-style models learned and
many chat models follow. An assistant's earlier calls and the tools' results in the history are written the same
way (``history``).

What the model may write, by ``tool_choice``:

- a named function: its arguments alone, held to the function's parameter schema by a grammar
  (structured_output.py), so the call is valid whatever the model; finish_reason "stop", as OpenAI's;
- "required": a JSON list of one or more calls (one, with ``parallel_tool_calls`` false), each a function's name
  and its arguments, held to the schemas likewise; finish_reason "tool_calls";
- "auto" (the default when tools are given): free text, from which ``<tool_call>`` blocks are read after it
  (or, without tags, a reply that is only a call's JSON or a list of them, as Llama 3's models write); a block
  whose JSON does not parse, or that names no offered function, leaves the whole text as content (nothing is
  lost). A response_format or guided_* grammar may still shape that text;
- "none": no calls, and the tools are not shown.

Streamed: a named function's arguments go out as they come; "required" calls go out whole once their list is
complete; under "auto" text streams as content until a ``<tool_call>`` begins (text that may be its start is held
back; a reply that opens with JSON is held to the end), and the calls go out at the end.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from tokenworks.structured_output import check_grammar, grammar_for

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

# The system message that shows the model its tools, where its chat template does not.
TOOLS_PROMPT = """You can call functions to help with the user's request. They are described as JSON within \
<tools></tools> tags:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object holding its name and its arguments within <tool_call></tool_call> \
tags, one call per pair of tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without parameters


class ToolError(ValueError):
    """A request's tools or tool_choice that cannot be served; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=call_id)

    def message(self, index: int | None = None) -> dict[str, Any]:
        """The call as a message's ``tool_calls`` entry; with ``index``, as a stream's delta entry."""
        entry = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def history(messages: list[Any], template_takes_tools: bool) -> list[dict[str, Any]]:
    """The chat template's messages from the request's (``schema.ChatMessage``): an assistant's tool calls and the
    tools' results given to a template that renders them as they are, else written into the text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls]
            if template_takes_tools:
                out.append({"role": "assistant", "content": text,
                            "tool_calls": [{"id": c.id, "type": "function", "function": call}
                                           for c, call in zip(m.tool_calls, calls)]})
            else:
                blocks = [f"{CALL_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CALL_CLOSE}" for call in calls]
                out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + blocks)})
        elif m.role == "tool":
            out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id} if template_takes_tools
                       else {"role": "tool", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            out.append({"role": m.role, "content": text})
    return out


def _call(value: Any, names: dict[str, Any]) -> Call | None:
    """A call from one decoded JSON value, or None if it is not one of the offered functions' (its arguments as
    an object or as JSON text; Llama 3's models write them as ``parameters``)."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return Call(value["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    return Call(value["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _whole_items(text: str, at: int = 0) -> tuple[list[Any], int]:
    """The items of a JSON list, perhaps cut short, read whole from character ``at`` (0: the list's start), and
    where reading stopped: ([], 0) if ``text`` is not a list's start."""
    if at == 0:
        body = text.lstrip()
        if not body.startswith("["):
            return [], 0
        at = len(text) - len(body) + 1
    items, read = [], json.JSONDecoder()
    while True:
        start = at
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            item, at = read.raw_decode(text, at)
        except ValueError:
            return items, start
        items.append(item)


def parse_calls(text: str, names: dict[str, Any]) -> tuple[str, list[Call]]:
    """(the text before the first call, the calls) from text the model wrote freely; ("the whole text", []) when
    it holds no call, or anything after its first ``<tool_call>`` is not a well-formed call (a last block may
    lack its closing tag: the model stopped). Without tags, a reply that is nothing but a call's JSON object or a
    list of them (how Llama 3's models call) is read as those calls."""
    start = text.find(CALL_OPEN)
    if start < 0:
        value = _json(text) if text.lstrip()[:1] in ("{", "[") else None
        calls = [_call(v, names) for v in (value if isinstance(value, list) else [value])]
        return ("", calls) if calls and all(calls) else (text, [])
    calls, rest = [], text[start:]
    while rest.strip():
        rest = rest.lstrip()
        if not rest.startswith(CALL_OPEN):
            return text, []
        end = rest.find(CALL_CLOSE)
        call = _call(_json(rest[len(CALL_OPEN): end if end >= 0 else len(rest)]), names)
        if call is None:
            return text, []
        calls.append(call)
        rest = rest[end + len(CALL_CLOSE):] if end >= 0 else ""
    return text[:start], calls


def _held_back(text: str, marker: str) -> int:
    """How many of ``text``'s last characters could be the start of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolUse:
    """One chat request's tool calling: what the model is shown, what it may write, and its reply read back."""

    def __init__(self, functions: list[dict[str, Any]], choice: str, parallel: bool) -> None:
        self.functions = {f["name"]: f for f in functions}  # name -> OpenAI's function object
        self.choice = choice  # "auto", "required", or the name of the function to call
        self.parallel = parallel

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
           parallel: bool = True) -> ToolUse | None:
        """From a request's ``tools`` (OpenAI's shape) and ``tool_choice``; None when no call may be made. Raises
        ToolError for a choice the tools cannot meet."""
        choice = tool_choice if tool_choice is None or isinstance(tool_choice, str) else tool_choice["function"]["name"]
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return None
        if not tools:
            raise ToolError(f"tool_choice {choice!r} needs tools", "tool_choice")
        functions = [t["function"] for t in tools]
        names = [f["name"] for f in functions]
        if len(set(names)) < len(names):
            raise ToolError("tools must have different names", "tools")
        if choice not in ("auto", "required") and choice not in names:
            raise ToolError(f"tool_choice names the function {choice!r}, which is not among the tools", "tool_choice")
        return cls(functions, choice, parallel)

    @property
    def named(self) -> bool:
        return self.choice not in ("auto", "required")

    def _parameters(self, name: str) -> dict[str, Any]:
        return self.functions[name].get("parameters") or NO_ARGUMENTS

    def grammar(self) -> str | None:
        """The grammar the model's text is held to (None under "auto"). Raises ToolError for a function's
        parameters that are not a usable JSON schema."""
        if self.choice == "auto":
            return None
        if self.named:
            schema = self._parameters(self.choice)
        else:
            calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": self._parameters(name)},
                      "required": ["name", "arguments"], "additionalProperties": False} for name in self.functions]
            schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
        try:
            grammar = grammar_for(json_schema=schema)
            check_grammar(grammar)
        except ValueError as e:
            raise ToolError(f"a function's parameters: {e}", "tools") from e
        return grammar

    def prompt(self, messages: list[dict[str, Any]], template_takes_tools: bool
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools) for the chat template: the tools passed to a template that renders them, else listed
        in the system message (after the client's own, if it sent one)."""
        tools = [{"type": "function", "function": f} for f in self.functions.values()]
        if template_takes_tools:
            return messages, tools
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] in ("system", "developer"):
            first = messages[0]
            return [{**first, "content": f"{first['content']}\n\n{listing}"}] + messages[1:], None
        return [{"role": "system", "content": listing}] + messages, None

    def _listed(self, text: str) -> list[Call]:
        """The calls of a "required" reply (a JSON list); cut by max_tokens, those whole before the cut ([] if
        none is: the reply is then its text)."""
        value = _json(text)
        calls = [_call(v, self.functions) for v in (value if isinstance(value, list) else _whole_items(text)[0])]
        return [c for c in calls if c is not None]

    def _calls(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls) of a whole reply."""
        if self.named:
            return None, [Call(self.choice, text)]
        if self.choice == "required":
            calls = self._listed(text)
            return (None if calls else text), calls
        content, calls = parse_calls(text, self.functions)
        if not self.parallel:
            calls = calls[:1]
        return (content if content.strip() or not calls else None), calls

    def finish_reason(self, called: bool, reason: str | None) -> str | None:
        return "tool_calls" if called and reason == "stop" and not self.named else reason

    def reply(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole choice's message and finish reason."""
        content, calls = self._calls(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.message() for c in calls]
        return message, self.finish_reason(bool(calls), reason)

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice's chat deltas under tool calling: ``feed`` each piece of text as it comes, ``end`` once
    it is finished."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.held = ""  # text not sent yet
        self.in_calls = False  # "auto": a <tool_call> (or a reply's JSON) has begun, everything from it on is held
        self.started = False  # "auto": the reply's first non-blank character has come
        self.named: Call | None = None  # a named function's call, once its first delta is out
        self.listed, self.read_to = 0, 0  # "required": the calls sent so far, and where the list was read to

    def feed(self, text: str) -> list[dict[str, Any]]:
        use = self.use
        if use.named:
            out = []
            if self.named is None:
                self.named = Call(use.choice, "")
                out.append({"tool_calls": [self.named.message(0)]})
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        self.held += text
        if use.choice == "required":  # each call goes out once it is whole (the grammar keeps the list valid)
            items, self.read_to = _whole_items(self.held, self.read_to)
            out = []
            for call in filter(None, (_call(v, use.functions) for v in items)):
                out.append({"tool_calls": [call.message(self.listed)]})
                self.listed += 1
            return out
        if self.in_calls:
            return []
        if not self.started:  # a reply that opens with JSON may be a call without tags: held to the end
            first = self.held.lstrip()[:1]
            if not first:
                return []
            self.started, self.in_calls = True, first in ("{", "[")
            if self.in_calls:
                return []
        at = self.held.find(CALL_OPEN)
        if at >= 0:
            content, self.held, self.in_calls = self.held[:at], self.held[at:], True
        else:
            cut = len(self.held) - _held_back(self.held, CALL_OPEN)
            content, self.held = self.held[:cut], self.held[cut:]
        return [{"content": content}] if content else []

    def end(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the finish reason."""
        use = self.use
        if use.named:
            return (self.feed("") if self.named is None else []), reason
        if use.choice == "auto" and not self.in_calls:
            return ([{"content": self.held}] if self.held else []), reason
        if use.choice == "required" and self.listed:
            return [], use.finish_reason(True, reason)  # every whole call has gone out; a cut one is dropped
        content, calls = use._calls(self.held)
        if not calls:
            return ([{"content": self.held}] if self.held else []), reason
        out = [{"content": content}] if content else []
        out += [{"tool_calls": [c.message(k)]} for k, c in enumerate(calls)]
        return out, use.finish_reason(bool(calls), reason)
