"""OpenAI's Responses API (/v1/responses): requests turned into chats, and the real server through the openai client,
every object and streamed event checked against the client's own types."""

import json

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.serving import Server
from tests.test_tools import TOOLS, valid_weather
from tokenworks.router.responses import ResponsesRequest

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's tools are flat
QUESTION = "What is the capital of France?"


def test_input_items_become_chat_messages():
    chat = ResponsesRequest.model_validate({
        "instructions": "Be brief.", "max_output_tokens": 9, "tools": FLAT_TOOLS, "tool_choice": "required",
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                               {"type": "input_text", "text": "Oslo and Rome?"}]},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                  {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": "3 C"},
                  {"type": "function_call_output", "call_id": "c2", "output": "19 C"}]}).as_chat()
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert chat.messages[0].text() == "Be brief." and chat.messages[1].text() == "Weather in Oslo and Rome?"
    assert [c.id for c in chat.messages[2].tool_calls] == ["c1", "c2"]  # consecutive calls: one assistant turn
    assert chat.messages[4].tool_call_id == "c2" and chat.messages[4].text() == "19 C"
    assert chat.max_tokens == 9 and chat.tool_choice == "required"
    assert [t.function.name for t in chat.tools] == ["get_weather", "get_time"]
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    named = ResponsesRequest.model_validate({"input": "Hi", "tools": FLAT_TOOLS,
                                             "tool_choice": {"type": "function", "name": "get_time"}}).as_chat()
    assert named.tool_choice.function.name == "get_time" and named.messages[0].role == "user"


@pytest.mark.parametrize("body, param", [
    ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text"),
])
def test_what_is_not_served_is_refused_naming_the_field(body, param):
    with pytest.raises(ValueError) as e:
        ResponsesRequest.model_validate(body).as_chat()
    assert e.value.args[1] == param


@pytest.fixture(scope="module")
def server():
    s = Server("--aggregated-workers", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


EVENT = TypeAdapter(ResponseStreamEvent)


def events_of(stream) -> list:
    """The stream's events, each validated against the openai client's types (strictly, not as it parses)."""
    events = list(stream)
    for e in events:
        EVENT.validate_python(e.model_dump())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


@pytest.mark.slow
def test_text_whole_and_streamed_is_the_chat_answer(server, client):
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=24, temperature=0)
    r = client.responses.create(model="default", input=QUESTION, max_output_tokens=24, temperature=0)
    Response.model_validate(r.model_dump())
    assert r.status == "completed" and r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    events = events_of(client.responses.create(model="default", input=QUESTION, max_output_tokens=24, temperature=0,
                                               stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens
    # cut by max_output_tokens: incomplete, and said so
    cut = client.responses.create(model="default", input="Tell me a long story.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    last = events_of(client.responses.create(model="default", input="Tell me a long story.", max_output_tokens=3,
                                             stream=True))[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    # instructions and a JSON schema for the text
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model="default", input=QUESTION, instructions="Answer in JSON.", temperature=0,
                                max_output_tokens=40,
                                text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    same = client.chat.completions.create(
        model="default", max_tokens=40, temperature=0, messages=[{"role": "system", "content": "Answer in JSON."},
                                                                 {"role": "user", "content": QUESTION}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"city"} and r.output_text == same.choices[0].message.content
    assert r.usage.input_tokens == same.usage.prompt_tokens
    server.wait_idle()


@pytest.mark.slow
def test_function_calls_and_their_outputs_go_round(server, client):
    r = client.responses.create(model="default", input="What is the weather like in Paris?", tools=FLAT_TOOLS,
                                tool_choice="required", temperature=0, max_output_tokens=120)
    Response.model_validate(r.model_dump())
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed" and all(c.call_id.startswith("call_") for c in calls)
    assert all(valid_weather(c.arguments) for c in calls if c.name == "get_weather")
    events = events_of(client.responses.create(
        model="default", input="What is the weather like in Paris?", tools=FLAT_TOOLS, temperature=0, stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == arguments and valid_weather(arguments)
    assert events[-1].type == "response.completed" and events[-1].response.output[0].name == "get_weather"
    # the call and its output sent back as input items: answered with text or another call
    follow = client.responses.create(
        model="default", tools=FLAT_TOOLS, temperature=0, max_output_tokens=30,
        input=[{"role": "user", "content": "What is the weather like in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 18}'}])
    assert follow.output and follow.usage.input_tokens > r.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="default", input="Hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    assert client.responses.create(model="default", input="Hi", max_output_tokens=2).output_text
    server.wait_idle()


def test_a_stream_of_text_then_calls_closes_each_item_before_the_next():
    """Streamed text and then two calls (as "auto" may give): the message item is closed before the first call's
    item opens, each call's arguments arrive as deltas and are repeated whole at its done event, and the final
    response lists the three items in order; every event valid for the openai client's types."""
    from tokenworks.router.responses import ResponseWriter

    body = ResponsesRequest.model_validate({"input": "Hi", "tools": FLAT_TOOLS})
    writer = ResponseWriter(body, "resp_1", 0, "default")
    raw = writer.start()
    for delta in ({"content": "Let me "}, {"content": "check."},
                  {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                   "function": {"name": "get_time", "arguments": '{"zone":'}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '"UTC"}'}}]},
                  {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city":"Oslo","unit":"celsius"}'}}]}):
        raw += writer.delta(delta)
    raw += writer.end("stop", ResponseWriter.usage(5, 0, 9))
    events = [EVENT.validate_json(line.split(b"data: ", 1)[1]) for line in raw]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [d.item.type for d in done] == ["message", "function_call", "function_call"]
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == \
        ['{"zone":"UTC"}', '{"city":"Oslo","unit":"celsius"}']
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.output_text == "Let me check."
    assert [(o.type, getattr(o, "call_id", None)) for o in final.output] == \
        [("message", None), ("function_call", "call_a"), ("function_call", "call_b")]
    assert final.usage.total_tokens == 14
