"""/v1/responses and /v1/messages end to end: a 2-rank server per model family (Meta's Llama 3.1
layout with its tiktoken tokenizer, Meta's Llama 2 layout with its SentencePiece one; random
weights, tests/families.py), driven by the official openai and anthropic SDKs. One server launch
per family for every test here and in test_langchain.py (conftest's family_server). Random weights
answer anything, so the checks are on what the protocol and the grammar guarantee: shapes,
counts, events, calls that parse, documents that fit."""
from __future__ import annotations

import json

import anthropic
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
          "required": ["city"], "additionalProperties": False}
FUNCTION = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": SCHEMA}
TOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": SCHEMA}


pytestmark = pytest.mark.parametrize("family_server", ["llama31", "llama2"], indirect=True)


@pytest.fixture
def server(family_server):
    return family_server


def oai(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", timeout=120, max_retries=0)


def claude(s) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.url, api_key="none", timeout=120, max_retries=0)


def test_responses_plain_streamed_and_continued(server):
    c = oai(server)
    r = c.responses.create(model="x", input="Hello there", instructions="Be brief.", max_output_tokens=6,
                           temperature=0)
    assert r.status == "incomplete" and r.usage.output_tokens == 6 and r.output[0].type == "message"
    again = c.responses.create(model="x", input="Hello there", instructions="Be brief.", max_output_tokens=6,
                               temperature=0)
    assert again.output_text == r.output_text  # greedy: the same answer
    # prefix reuse: every whole KV block (16 positions) before the prompt's last token
    assert again.usage.input_tokens_details.cached_tokens == (r.usage.input_tokens - 1) // 16 * 16
    events = list(c.responses.create(model="x", input=[{"role": "user", "content": "Hello there"}],
                                     instructions="Be brief.", max_output_tokens=6, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # multi-turn input, then the same conversation by previous_response_id: one prompt
    turns = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": r.output_text},
             {"role": "user", "content": "And then?"}]
    listed = c.responses.create(model="x", input=turns, max_output_tokens=4, temperature=0)
    chained = c.responses.create(model="x", input="And then?", previous_response_id=r.id, max_output_tokens=4,
                                 temperature=0)
    assert chained.usage.input_tokens == listed.usage.input_tokens and chained.output_text == listed.output_text


def test_responses_json_schema_answer_is_a_document(server):
    r = oai(server).responses.create(model="x", input="Where?", max_output_tokens=60, text={"format": {
        "type": "json_schema", "name": "place", "schema": SCHEMA, "strict": True}})
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"city"}


def test_responses_forced_function_call(server):
    r = oai(server).responses.create(model="x", input="Weather in Paris?", tools=[FUNCTION], max_output_tokens=60,
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     parallel_tool_calls=False)
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}


def test_messages_create_stream_and_count_tokens(server):
    c = claude(server)
    body = dict(model="x", max_tokens=6, system="Be brief.", messages=[{"role": "user", "content": "Hello there"}],
                extra_body={"temperature": 0})
    m = c.messages.create(**body)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 6 and m.content[0].type == "text"
    with c.messages.stream(**body) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    assert text == m.content[0].text and final.stop_reason == "max_tokens"
    counted = c.messages.count_tokens(model="x", system="Be brief.",
                                      messages=[{"role": "user", "content": "Hello there"}]).input_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted
    # the same prompt again: its KV blocks (16 positions each, before the last token) were reused
    assert final.usage.cache_read_input_tokens == (counted - 1) // 16 * 16


def test_messages_forced_tool_use_and_a_round_trip(server):
    c = claude(server)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    m = c.messages.create(model="x", max_tokens=60, tools=[TOOL], messages=ask, tool_choice={
        "type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    use = m.content[0]
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and set(use.input) == {"city"}
    reply = c.messages.create(model="x", max_tokens=5, tools=[TOOL], messages=ask + [
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > m.usage.input_tokens


def test_streamed_calls_come_in_fragments_the_sdks_rebuild(server):
    """Both fronts stream a call as chat does (its scanner): the name first, then the arguments
    in fragments as generated; each SDK's stream state rebuilds what the final answer holds."""
    with oai(server).responses.stream(model="x", input="Weather in Paris?", tools=[FUNCTION], max_output_tokens=60,
                                      tool_choice={"type": "function", "name": "get_weather"},
                                      parallel_tool_calls=False) as st:
        events = list(st)
        final = st.get_final_response()
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    call = final.output[0]
    assert final.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    assert len(deltas) > 1 and deltas[-1].snapshot == call.arguments and set(json.loads(call.arguments)) == {"city"}
    with claude(server).messages.stream(model="x", max_tokens=60, tools=[TOOL], tool_choice={
            "type": "any", "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": "Weather in Paris?"}]) as st:
        fragments = [e.partial_json for e in st if e.type == "input_json"]
        final = st.get_final_message()
    use = final.content[0]
    assert final.stop_reason == "tool_use" and use.type == "tool_use" and set(use.input) == {"city"}
    assert len(fragments) > 1 and json.loads("".join(fragments)) == use.input
