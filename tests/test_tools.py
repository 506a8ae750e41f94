"""Tool calling: the calls read back from a model's text (whole and streamed in pieces of every size), what a
tool_choice lets the model write, and the real server through the openai client with the default model."""

import json

import httpx
import openai
import pytest

from tests.serving import Server
from tokenworks.router.tools import CALL_CLOSE, CALL_OPEN, ToolError, ToolUse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now in a timezone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                                                 "maxLength": 20}},
                                                        "required": ["zone"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


def call_text(name: str, arguments: dict) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CALL_CLOSE}"


def streamed(use: ToolUse, text: str, piece: int, reason: str = "stop"):
    """The stream's deltas for ``text`` fed ``piece`` characters at a time, folded back into a message."""
    stream, deltas = use.stream(), []
    for k in range(0, len(text), piece):
        deltas += stream.feed(text[k:k + piece])
    last, reason = stream.end(reason)
    deltas += last
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", ()):
            entry = calls.setdefault(c["index"], {"id": c.get("id"), "name": "", "arguments": ""})
            entry["name"] += c.get("function", {}).get("name", "")
            entry["arguments"] += c["function"].get("arguments", "")
    return content, [calls[k] for k in sorted(calls)], reason, deltas


@pytest.mark.parametrize("text, content, names", [
    ("Sure." + call_text("get_weather", {"city": "Paris", "unit": "celsius"}), "Sure.", ["get_weather"]),
    (call_text("get_weather", {"city": "Oslo", "unit": "celsius"}) + "\n" + call_text("get_time", {"zone": "CET"}),
     None, ["get_weather", "get_time"]),
    (f'{CALL_OPEN}{{"name": "get_time", "arguments": {{"zone": "UTC"}}}}', None, ["get_time"]),  # stopped unclosed
    (f'{CALL_OPEN}{{"name": "get_time", "arguments": "{{\\"zone\\": \\"UTC\\"}}"}}{CALL_CLOSE}', None, ["get_time"]),
    ("No call here, only a < sign and <tool", "No call here, only a < sign and <tool", []),
    (call_text("launch_rocket", {}), call_text("launch_rocket", {}), []),  # not an offered function: left as text
    (f"{CALL_OPEN}{{not json{CALL_CLOSE}", f"{CALL_OPEN}{{not json{CALL_CLOSE}", []),
    (call_text("get_time", {"zone": "UTC"}) + " and then some words", None, []),  # text after a call: all kept
    ('\n{"name": "get_time", "parameters": {"zone": "UTC"}}', None, ["get_time"]),  # Llama 3's way: no tags
    ('[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "now", "arguments": {}}]', None, []),  # "now"
    ('[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "arguments": {"city": "Oslo", '
     '"unit": "celsius"}}]', None, ["get_time", "get_weather"]),
    ('{"answer": 42}', None, []),  # JSON, not a call: content
    ("  [1, 2, 3] are numbers", None, []),
])
def test_auto_reads_calls_whole_and_streamed_in_pieces_of_every_size(text, content, names):
    use = ToolUse.of(TOOLS, "auto")
    message, reason = use.reply(text, "stop")
    if not names:
        content = text
    assert message["content"] == content
    assert [c["function"]["name"] for c in message.get("tool_calls", ())] == names
    assert reason == ("tool_calls" if names else "stop")
    for c in message.get("tool_calls", ()):
        assert c["id"].startswith("call_") and isinstance(json.loads(c["function"]["arguments"]), dict)
    for piece in range(1, len(text) + 1):
        got_content, got_calls, got_reason, deltas = streamed(use, text, piece)
        assert (got_content or None) == (content if names else text or None)
        assert [c["name"] for c in got_calls] == names and got_reason == reason
        assert [json.loads(c["arguments"]) for c in got_calls] == \
            [json.loads(c["function"]["arguments"]) for c in message.get("tool_calls", ())]
        assert not any(CALL_OPEN[:2] in d.get("content", "") for d in deltas) or not names  # never half a tag


def test_parallel_tool_calls_false_keeps_the_first_call_and_max_tokens_keeps_its_reason():
    text = call_text("get_weather", {"city": "Oslo", "unit": "celsius"}) + call_text("get_time", {"zone": "CET"})
    message, reason = ToolUse.of(TOOLS, "auto", parallel=False).reply(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] and reason == "tool_calls"
    message, reason = ToolUse.of(TOOLS, "auto").reply(text[:30], "length")
    assert message == {"role": "assistant", "content": text[:30]} and reason == "length"


def test_named_and_required_replies_and_their_streams():
    named = ToolUse.of(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    message, reason = named.reply('{"zone":"UTC"}', "stop")
    assert message["content"] is None and reason == "stop"  # OpenAI's reason for a function it was told to call
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [("get_time", '{"zone":"UTC"}')]
    content, calls, reason, deltas = streamed(named, '{"zone":"UTC"}', 3)
    assert content == "" and calls[0]["name"] == "get_time" and calls[0]["arguments"] == '{"zone":"UTC"}'
    assert deltas[0]["tool_calls"][0]["id"].startswith("call_") and reason == "stop"
    assert len(deltas) == 1 + 5  # the call's name first, then the arguments as they came
    required = ToolUse.of(TOOLS, "required")
    text = '[{"name":"get_weather","arguments":{"city":"Rome","unit":"celsius"}},{"name":"get_time","arguments":{"zone":"CET"}}]'
    message, reason = required.reply(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert reason == "tool_calls" and message["content"] is None
    content, calls, reason, _ = streamed(required, text, 7)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"] and reason == "tool_calls" and content == ""
    message, reason = required.reply(text[:20], "length")  # cut short: the text, not a call
    assert message["content"] == text[:20] and "tool_calls" not in message and reason == "length"
    cut = text[:-20]  # cut in the second call: the first, whole, is a call; the length is the reason
    message, reason = required.reply(cut, "length")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [("get_weather", '{"city":"Rome","unit":"celsius"}')] and message["content"] is None and reason == "length"
    content, calls, reason, _ = streamed(required, cut, 7, "length")
    assert [c["name"] for c in calls] == ["get_weather"] and reason == "length" and content == ""
    stream = required.stream()  # streamed, a call goes out as soon as it is whole, not at the end
    early = [d for k in range(0, len(cut), 7) for d in stream.feed(cut[k:k + 7])]
    assert [d["tool_calls"][0]["function"]["name"] for d in early] == ["get_weather"]
    assert early[0]["tool_calls"][0]["index"] == 0 and early[0]["tool_calls"][0]["id"].startswith("call_")
    assert stream.end("length") == ([], "length")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenworks.model.weights import load_model_files
    from tokenworks.tokenizer import Tokenizer

    files = load_model_files(None)
    return Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)


def test_grammars_hold_the_reply_to_the_schemas(tokenizer):
    import llguidance

    lltok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                   eos_token=tokenizer.encode(tokenizer.eos_token, add_special_tokens=False))

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
        return not matcher.is_error() and matcher.is_accepting()

    named = ToolUse.of(TOOLS, {"type": "function", "function": {"name": "get_weather"}}).grammar()
    assert accepts(named, '{"city":"Paris","unit":"celsius"}')
    assert not accepts(named, '{"city":"Paris","unit":"kelvin"}') and not accepts(named, '{"city":"Paris"}')
    required = ToolUse.of(TOOLS + [NOW], "required").grammar()
    assert accepts(required, '[{"name":"now","arguments":{}},{"name":"get_time","arguments":{"zone":"UTC"}}]')
    assert not accepts(required, "[]") and not accepts(required, '[{"name":"nope","arguments":{}}]')
    single = ToolUse.of(TOOLS, "required", parallel=False).grammar()
    assert accepts(single, '[{"name":"get_time","arguments":{"zone":"UTC"}}]')
    assert not accepts(single, '[{"name":"get_time","arguments":{"zone":"UTC"}},{"name":"get_time","arguments":{"zone":"CET"}}]')
    assert ToolUse.of(TOOLS, "auto").grammar() is None


@pytest.mark.parametrize("tools, choice, param", [
    (None, "required", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "get_stock_price"}}, "tool_choice"),
    ([WEATHER, WEATHER], "auto", "tools"),
])
def test_a_choice_the_tools_cannot_meet_is_refused_naming_the_field(tools, choice, param):
    with pytest.raises(ToolError, match="tool") as e:
        ToolUse.of(tools, choice)
    assert e.value.param == param
    assert ToolUse.of(TOOLS, "none") is None and ToolUse.of(None, None) is None
    assert ToolUse.of(TOOLS, None).choice == "auto"


def test_the_tools_are_shown_in_the_system_message_unless_the_template_renders_them():
    use = ToolUse.of(TOOLS, "auto")
    messages, shown = use.prompt([{"role": "user", "content": "Hi"}], template_takes_tools=False)
    assert shown is None and messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert CALL_OPEN in messages[0]["content"] and messages[1] == {"role": "user", "content": "Hi"}
    messages, _ = use.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], False)
    assert messages[0]["content"].startswith("Be brief.\n\n") and '"get_time"' in messages[0]["content"]
    assert len(messages) == 2
    messages, shown = use.prompt([{"role": "user", "content": "Hi"}], template_takes_tools=True)
    assert messages == [{"role": "user", "content": "Hi"}] and [t["function"]["name"] for t in shown] == \
        ["get_weather", "get_time"]


# --- the real server, the default model, the openai client -------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    # one prefill and one decode worker, a threshold low enough that a tool prompt is prefilled remotely: the
    # first token of a held reply is then chosen on the prefill worker under the same grammar
    s = Server("--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-threshold", "32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def valid_weather(arguments: str) -> bool:
    value = json.loads(arguments)
    return set(value) == {"city", "unit"} and value["unit"] in ("celsius", "fahrenheit") and isinstance(value["city"], str)


@pytest.mark.slow
def test_required_and_named_tool_choices_give_valid_calls(server, client):
    chat = client.chat.completions.create
    r = chat(model="default", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        assert valid_weather(call.function.arguments) if call.function.name == "get_weather" else set(args) == {"zone"}
    assert server.metric("tokenworks:prefills_total", 'where="remote"') >= 1
    named = dict(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = chat(**named)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and valid_weather(call.function.arguments)
    # streamed: the same call, its arguments arriving in pieces
    pieces, names, reasons, ids = [], [], [], set()
    for chunk in chat(**named, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for t in choice.delta.tool_calls or ():
                ids.add(t.id) if t.id else None
                names.append(t.function.name or "")
                pieces.append(t.function.arguments or "")
    assert "".join(names) == "get_weather" and "".join(pieces) == call.function.arguments
    assert len([p for p in pieces if p]) > 1 and len(ids) == 1 and reasons[-1] == "stop"
    # one call only, when parallel calls are off; n choices each held
    r = chat(model="default", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
             temperature=0.8, seed=3, n=3, max_tokens=120)
    assert all(len(c.message.tool_calls) == 1 and c.finish_reason == "tool_calls" for c in r.choices)
    server.wait_idle()


@pytest.mark.slow
def test_auto_reads_a_call_and_the_tool_result_goes_back_to_the_model(server, client):
    """Under "auto" the model writes freely (the default model rarely calls a tool: a guided_regex here has it
    write one, and the server must read it back out of the text); then the call and its result, sent back in the
    history as a client does, are written into the prompt and answered."""
    chat = client.chat.completions.create
    plain = chat(model="default", messages=ASK, max_tokens=1, temperature=0)
    forced = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'
    r = chat(model="default", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
             extra_body={"guided_regex": forced})
    c = r.choices[0]
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools were shown to the model
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    stream = chat(model="default", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0, stream=True,
                  extra_body={"guided_regex": forced})
    chunks = list(stream)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert not any(d.content for d in deltas)  # the call's text never streams as content
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # free text under "auto" streams as content
    free = chat(model="default", messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    streamed_free = "".join(ch.choices[0].delta.content or "" for ch in
                            chat(model="default", messages=ASK, tools=TOOLS, max_tokens=12, temperature=0, stream=True)
                            if ch.choices)
    assert free.choices[0].message.content and streamed_free == free.choices[0].message.content
    # the round trip: the assistant's call and the tool's result in the history
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [c.message.tool_calls[0].model_dump()]},
                     {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": '{"temperature": 18}'}]
    answer = chat(model="default", messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    server.wait_idle()


@pytest.mark.slow
def test_tool_requests_that_cannot_be_served_are_refused_and_the_server_stays_up(server, client):
    chat = client.chat.completions.create

    def refused(param, **kwargs):
        with pytest.raises(openai.BadRequestError) as e:
            chat(model="default", messages=ASK, max_tokens=4, **kwargs)
        assert e.value.body["param"] == param, e.value.body
        return e.value.body["message"]

    refused("tool_choice", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_stock"}})
    refused("tool_choice", tool_choice="required")
    refused("tools", tools=[WEATHER, WEATHER])
    refused("tool_choice", tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    refused("logprobs", tools=TOOLS, stream=True, logprobs=True)
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "object",
                                                                          "properties": {"a": {"$ref": "#/nowhere"}}}}}
    refused("tools", tools=[bad], tool_choice="required")
    raw = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "tools": [{"type": "function",
                     "function": {"name": "has spaces"}}]}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["param"].startswith("tools")
    assert chat(model="default", messages=ASK, max_tokens=2, tools=TOOLS, tool_choice="none").choices[0].message.content
    server.wait_idle()


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_they_are(tokenizer):
    """A chat template of the kind Qwen's and Hermes' are (it reads ``tools`` and an assistant's ``tool_calls``):
    no system message is added, the calls reach it as objects and a tool's result with its call's id."""
    from tokenworks.router.schema import ChatMessage
    from tokenworks.router.tools import history
    from tokenworks.tokenizer import Tokenizer

    template = ("{% if tools %}[tools:{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} {{ c.function.arguments | tojson }})"
                "{% endfor %}{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}<assistant>")
    tok = Tokenizer(tokenizer.to_json(), template, tokenizer.bos_token, tokenizer.eos_token)
    assert tok.template_takes_tools and not tokenizer.template_takes_tools
    messages = [ChatMessage.model_validate(m) for m in ASK + [
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]]
    use = ToolUse.of(TOOLS, "auto")
    shown, tools = use.prompt(history(messages, True), True)
    assert tok.apply_chat_template(shown, tools=tools) == (
        '[tools:get_weather;get_time;]<user>What is the weather like in Paris?<assistant>(call get_time {"zone": "UTC"})'
        "<tool>12:00(for call_1)<assistant>")
    written = history(messages, False)  # the default model's template: the same history written as text
    assert written[1] == {"role": "assistant", "content": f'{CALL_OPEN}\n{{"name": "get_time", "arguments": '
                                                          f'{{"zone": "UTC"}}}}\n{CALL_CLOSE}'}
    assert written[2] == {"role": "tool", "content": "<tool_response>\n12:00\n</tool_response>"}
