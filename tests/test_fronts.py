"""OpenAI's Responses API and Anthropic's Messages API over the fake engine, through the official
SDKs (openai, anthropic): translation into the chat rules' Job, streaming events, tools, stored
responses, errors in each API's shape, and a walk over each SDK's request fields."""
from __future__ import annotations

import json
import typing

import anthropic
import httpx
import openai
import pytest

from conftest import make_tokenizer
from fakes import FakeClient, ServerThread, chat_format, expected_text
from test_web import TOOL_TEMPLATE, WEATHER
from llama_demo.config import ServerConfig
from llama_demo.model.parallel import free_port
from llama_demo.serve import protocol as p
from llama_demo.serve.app import build_app
from llama_demo.serve.response_store import ResponseStore
from llama_demo.text.chat_format import JinjaChatFormat, Message
from llama_demo.text.tokenizer import load_tokenizer

SEQ = 256
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
ANTHROPIC_WEATHER = [{"name": "get_weather", "description": "Weather in a city",
                      "input_schema": WEATHER[0]["function"]["parameters"]}]
RESPONSES_WEATHER = [{"type": "function", **WEATHER[0]["function"]}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def chat(tok):
    client, fmt = FakeClient(tok, max_seq_len=SEQ), chat_format(tok)
    with ServerThread(build_app(client, fmt, ServerConfig(api_key="sk-test")), free_port()) as s:
        yield client, fmt, s


@pytest.fixture(scope="module")
def tools(tok):
    """A server whose template has tools and whose fake model answers a tool call."""
    client = FakeClient(tok, max_seq_len=SEQ, script=CALL)
    with ServerThread(build_app(client, JinjaChatFormat(TOOL_TEMPLATE, tok), ServerConfig()), free_port()) as s:
        yield client, s


def oai(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-test", max_retries=0, timeout=10)


def claude(s) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.url, api_key="sk-test", max_retries=0, timeout=10)


# --- Responses ------------------------------------------------------------------------------------


def test_responses_input_and_instructions_are_the_chat_dialog(chat, tok):
    client, fmt, s = chat
    r = oai(s).responses.create(model="m", input="hi llama", instructions="Be brief.", max_output_tokens=6)
    ids = fmt.encode_dialog([Message("system", "Be brief."), Message("user", "hi llama")])
    assert client.requests[-1][0] == ids and client.requests[-1][1].max_new_tokens == 6
    assert r.output_text == expected_text(tok, ids, 6, SEQ)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(ids), 6)
    assert r.usage.input_tokens_details.cached_tokens == 0


def test_responses_stream_is_the_event_sequence(chat, tools, tok):
    client, fmt, s = chat
    events = list(oai(s).responses.create(model="m", input=[{"role": "user", "content": "tell me"}],
                                          max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == expected_text(tok, client.requests[-1][0], 8, SEQ)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "".join(deltas)
    # the SDK's helper wants response.completed: an answer that ends before max_output_tokens
    with oai(tools[1]).responses.stream(model="m", input="hi", max_output_tokens=60) as stream:
        final = stream.get_final_response()
    assert final.output_text == CALL and final.status == "completed"


def test_previous_response_id_continues_the_dialog_and_get_delete(chat, tok):
    client, fmt, s = chat
    c = oai(s)
    first = c.responses.create(model="m", input="hi llama", instructions="Be brief.", max_output_tokens=4,
                               metadata={"run": "7"})
    assert first.metadata == {"run": "7"} and first.store
    second = c.responses.create(model="m", input="and then?", previous_response_id=first.id, max_output_tokens=4)
    dialog = [Message("user", "hi llama"), Message("assistant", first.output_text), Message("user", "and then?")]
    assert client.requests[-1][0] == fmt.encode_dialog(dialog)  # instructions are not carried over
    assert second.previous_response_id == first.id
    assert c.responses.retrieve(first.id).output_text == first.output_text
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        c.responses.create(model="m", input="x", previous_response_id=first.id)
    unstored = c.responses.create(model="m", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_the_store_is_bounded_and_says_when_a_response_expired():
    store = ResponseStore(max_count=2, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"r{i}", "output": []}, [Message("user", "x" * 100)])
    assert [rid for rid in ("r0", "r1", "r2") if rid in store._items] == ["r1", "r2"]
    with pytest.raises(Exception, match="has expired"):
        store.get("r0", "previous_response_id")
    store.put({"id": "big", "output": []}, [Message("user", "x" * 20_000)])  # over the bytes bound
    assert store.bytes <= 10_000
    with pytest.raises(Exception, match="has expired"):
        store.get("big")
    with pytest.raises(Exception, match="no stored response"):
        store.get("never")


def test_responses_json_schema_is_the_grammar(chat):
    client, _, s = chat
    oai(s).responses.create(model="m", input="who?", max_output_tokens=20, text={"format": {
        "type": "json_schema", "name": "person", "schema": {"type": "object", "properties": {"age": {"type": "integer"}}}}})
    assert '"age"' in client.requests[-1][1].grammar
    r = httpx.post(f"{s.url}/v1/responses", headers={"Authorization": "Bearer sk-test"}, json={
        "input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "#"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format"


def test_responses_function_calls_and_their_outputs(tools, tok):
    client, s = tools
    c = oai(s)
    r = c.responses.create(model="m", input="weather?", tools=RESPONSES_WEATHER, max_output_tokens=60,
                           tool_choice={"type": "function", "name": "get_weather"})
    assert '"get_weather"' in client.requests[-1][1].grammar
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(c.responses.create(model="m", input="weather?", tools=RESPONSES_WEATHER, max_output_tokens=60,
                                     stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and json.loads(done[0].arguments) == {"city": "Paris"} and events[-1].type == "response.completed"
    follow = [{"role": "user", "content": "weather?"},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    c.responses.create(model="m", input=follow, tools=RESPONSES_WEATHER, max_output_tokens=60)
    prompt = tok.decode(client.requests[-1][0])
    assert "assistant: get_weather" in prompt and "ipython: sunny" in prompt
    r = httpx.post(f"{s.url}/v1/responses", json={"input": "x", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.type"


def test_responses_stream_a_call_as_it_is_generated(tools):
    """The call's item opens with its name, its arguments come in fragments (chat's scanner), and
    the SDK's stream state rebuilds the call the final response holds."""
    client, s = tools
    with oai(s).responses.stream(model="m", input="weather?", tools=RESPONSES_WEATHER, max_output_tokens=60) as st:
        events = list(st)
        final = st.get_final_response()
    kinds = [e.type for e in events]
    added = events[kinds.index("response.output_item.added")].item
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert added.type == "function_call" and added.name == "get_weather" and added.arguments == ""
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
    assert len(deltas) > 1 and json.loads(deltas[-1].snapshot) == {"city": "Paris"}  # the SDK's accumulation
    call = final.output[0]
    assert (call.id, call.call_id, call.arguments) == (added.id, added.call_id, deltas[-1].snapshot)
    assert "response.output_text.delta" not in kinds and final.status == "completed"


# --- Messages -------------------------------------------------------------------------------------


def test_messages_create_is_the_chat_dialog(chat, tok):
    client, fmt, s = chat
    m = claude(s).messages.create(model="m", max_tokens=5, system=[{"type": "text", "text": "Be brief."}],
                                  messages=[{"role": "user", "content": [{"type": "text", "text": "hi llama"}]}],
                                  stop_sequences=["zz"], extra_body={"temperature": 0.5, "top_k": 4, "top_p": 0.9})
    ids = fmt.encode_dialog([Message("system", "Be brief."), Message("user", "hi llama")])
    prompt, params = client.requests[-1]
    assert prompt == ids and (params.temperature, params.top_k, params.top_p, params.stop) == (0.5, 4, 0.9, ["zz"])
    assert m.content[0].text == expected_text(tok, ids, 5, SEQ) and m.stop_reason == "max_tokens"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids) and m.usage.output_tokens == 5
    assert claude(s).messages.count_tokens(model="m", system="Be brief.", messages=[
        {"role": "user", "content": "hi llama"}]).input_tokens == len(ids)


def test_messages_stream_events_and_stop_sequences(tok):
    client = FakeClient(tok, max_seq_len=SEQ, script="It is sunny. STOP here")
    with ServerThread(build_app(client, chat_format(tok), ServerConfig()), free_port()) as s:
        with claude(s).messages.stream(model="m", max_tokens=40, messages=[{"role": "user", "content": "hi"}]) as st:
            text = "".join(st.text_stream)
            final = st.get_final_message()
        assert text == "It is sunny. STOP here" and final.stop_reason == "end_turn"
        with httpx.stream("POST", f"{s.url}/v1/messages", json={"model": "m", "max_tokens": 4, "stream": True,
                                                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
        assert names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    # the fake engine ignores stop strings: the server reads which one ended an answer from its ids
    from llama_demo.serve.fronts import matched_stop

    ids = tok.encode("It is sunny. STOP here", bos=False)
    assert matched_stop(tok, ids, "It is sunny. ", ["here", "STOP"]) == "STOP"


def test_messages_tool_use_forced_and_round_trip(tools, tok):
    client, s = tools
    c = claude(s)
    m = c.messages.create(model="m", max_tokens=60, tools=ANTHROPIC_WEATHER, tool_choice={"type": "any"},
                          messages=[{"role": "user", "content": "weather?"}])
    assert client.requests[-1][1].grammar and m.stop_reason == "tool_use"
    use = m.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    with c.messages.stream(model="m", max_tokens=60, tools=ANTHROPIC_WEATHER,
                           messages=[{"role": "user", "content": "weather?"}]) as st:
        final = st.get_final_message()
    # the SDK's accumulator rebuilt the input from the input_json_delta fragments below
    assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    with httpx.stream("POST", f"{s.url}/v1/messages", json={"model": "m", "max_tokens": 60, "stream": True,
                                                            "tools": ANTHROPIC_WEATHER,
                                                            "messages": [{"role": "user", "content": "weather?"}]}) as r:
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    start = next(d for d in data if d["type"] == "content_block_start")["content_block"]
    fragments = [d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["id"].startswith("toolu_")
    assert len(fragments) > 1 and json.loads("".join(fragments)) == {"city": "Paris"}  # streamed as generated
    c.messages.create(model="m", max_tokens=60, tools=ANTHROPIC_WEATHER, messages=[
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    prompt = tok.decode(client.requests[-1][0])
    assert "assistant: get_weather" in prompt and "ipython: sunny" in prompt


def test_messages_errors_are_anthropic_shaped(chat):
    s = chat[2]
    url = f"{s.url}/v1/messages"
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=body).json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=body, headers={"x-api-key": "sk-test"}).status_code == 200
    for bad, words in [({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                        "messages.0.content.0.type"),
                       ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking"),
                       ({"temperature": -1}, "temperature"), ({"max_tokens": None}, "max_tokens")]:
        r = httpx.post(url, json={**body, **bad}, headers={"x-api-key": "sk-test"})
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["message"].startswith(words), r.text
    with pytest.raises(anthropic.BadRequestError, match="document"):
        claude(s).messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])


def test_metrics_count_the_new_endpoints(chat):
    s = chat[2]
    oai(s).responses.create(model="m", input="hi", max_output_tokens=2)
    claude(s).messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(f"{s.url}/metrics").text
    assert 'llama_demo_requests_total{endpoint="/v1/responses",outcome="length"}' in text
    assert 'llama_demo_requests_total{endpoint="/v1/messages",outcome="length"}' in text


# --- every SDK request field is honoured, a label, or a 400 naming it -------------------------------

# field -> (a valid value, check(params, body)); a field not here must be a label or a 400
RESPONSES_HONOURED = {
    "model": ("other", lambda p, b: b["model"] == "fake-llama"),
    "input": ("hi", lambda p, b: True),
    "instructions": ("Be brief.", lambda p, b: b["instructions"] == "Be brief."),
    "max_output_tokens": (3, lambda p, b: p.max_new_tokens == 3),
    "temperature": (0.5, lambda p, b: p.temperature == 0.5),
    "top_p": (0.5, lambda p, b: p.top_p == 0.5),
    "text": ({"format": {"type": "json_object"}}, lambda p, b: p.grammar is not None),
    "tools": ([{"type": "function", "name": "f", "parameters": {"type": "object"}}], lambda p, b: True),
    "tool_choice": ("none", lambda p, b: p.grammar is None),
    "parallel_tool_calls": (True, lambda p, b: True),
    "store": (False, lambda p, b: not b["store"]),
    "stream_options": ({"include_obfuscation": False}, lambda p, b: True),  # we pad nothing
    "previous_response_id": (None, lambda p, b: True),  # set by the test, to a stored id
    "stream": (False, lambda p, b: b["object"] == "response"),
}
MESSAGES_HONOURED = {
    "model": ("other", lambda p, b: b["model"] == "fake-llama"),
    "messages": ([{"role": "user", "content": "hi"}], lambda p, b: True),
    "max_tokens": (3, lambda p, b: p.max_new_tokens == 3),
    "system": ("Be brief.", lambda p, b: True),
    "stop_sequences": (["zz"], lambda p, b: p.stop == ["zz"]),
    "temperature": (0.5, lambda p, b: p.temperature == 0.5),
    "top_p": (0.5, lambda p, b: p.top_p == 0.5),
    "top_k": (3, lambda p, b: p.top_k == 3),
    "tools": (ANTHROPIC_WEATHER, lambda p, b: True),
    "tool_choice": ({"type": "none"}, lambda p, b: p.grammar is None),
    "output_config": ({"format": {"type": "json_schema", "schema": {"type": "object"}}}, lambda p, b: p.grammar),
    "stream": (False, lambda p, b: b["type"] == "message"),
}
MESSAGES_LABELS = ("metadata", "cache_control", "user_profile_id", "workspace_id")


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_every_sdk_request_field_is_honoured_a_label_or_refused(tools, api):
    from anthropic.types import message_create_params
    from openai.types.responses import response_create_params

    client, s = tools
    if api == "responses":
        fields = set(typing.get_type_hints(response_create_params.ResponseCreateParamsBase)) | {"stream"}
        honoured, labels, base, path = RESPONSES_HONOURED, p.LABELS, {"input": "hi", "max_output_tokens": 2}, "responses"
        honoured = {**honoured, "previous_response_id": (oai(s).responses.create(input="hi", model="m",
                                                                                 max_output_tokens=2).id,
                                                          lambda p, b: b["previous_response_id"] is not None)}
    else:  # this SDK sends temperature, top_p and top_k as extra_body: Anthropic's API still takes them
        fields = set(typing.get_type_hints(message_create_params.MessageCreateParamsBase)) | {
            "stream", "temperature", "top_p", "top_k"}
        honoured, labels, path = MESSAGES_HONOURED, MESSAGES_LABELS, "messages"
        base = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for field in sorted(fields):
        value = honoured.get(field, ({"x": 1},))[0]
        r = httpx.post(f"{s.url}/v1/{path}", json={**base, field: value})
        if r.status_code == 400:
            message = r.json()["error"]["message"]
            assert message.startswith(field), (field, r.text)
            assert field not in honoured, f"{field} is honoured, yet a valid value was refused: {r.text}"
            continue
        assert r.status_code == 200, (field, r.text)
        if field in honoured:
            assert honoured[field][1](client.requests[-1][1], r.json()), f"{field} was not honoured"
        else:
            assert field in labels, f"{field} was accepted, but is neither honoured nor a label"
