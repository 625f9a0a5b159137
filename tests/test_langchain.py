"""LangChain's ChatOpenAI against 2-rank servers of the three families (Meta's Llama 3.1 layout:
Meta's JSON tool calls; Llama 2's layout and the default model's template: the generic tool
format; tests/families.py), the servers shared with test_fronts_server.py (conftest's
family_server). Random weights answer anything, so what is checked is what the server enforces:
forced calls that parse into the client's schema, streamed calls the client rebuilds, documents
that validate, and the protocol's counts. instructor is absent: no release installs beside
openai 3.57.0 (every 1.x pins jiter<0.15, openai needs jiter>=0.16; 0.x pins openai<2)."""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from families import FAMILIES

pytestmark = pytest.mark.parametrize("family_server", FAMILIES, indirect=True)


class GetWeather(BaseModel):
    """Weather in a city, for some days."""
    model_config = ConfigDict(extra="forbid")  # additionalProperties false: a random model adds no keys
    city: str = Field(max_length=8, description="the city's name")
    days: int = Field(ge=1, le=7)


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    visited: bool


ASK = [SystemMessage("Be brief."), HumanMessage("Weather in Paris for two days?")]


def chat(server, max_tokens: int, **kw) -> ChatOpenAI:
    return ChatOpenAI(model="x", base_url=server.url + "/v1", api_key="none", temperature=0, max_tokens=max_tokens,
                      max_retries=0, timeout=120, **kw)


def check_call(call: dict) -> None:
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather(**call["args"])  # the grammar kept it to the schema: validates


def test_invoke_and_stream_agree(family_server):
    llm = chat(family_server, 6)
    msg = llm.invoke([HumanMessage("Hello there")])
    assert isinstance(msg, AIMessage) and msg.response_metadata["finish_reason"] == "length"
    assert msg.usage_metadata["output_tokens"] == 6 and msg.usage_metadata["input_tokens"] > 0
    chunks = list(llm.stream([HumanMessage("Hello there")]))
    whole = sum(chunks[1:], chunks[0])
    assert len(chunks) > 2 and whole.content == msg.content  # greedy: the same text, in pieces


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_forced_tool_call_invoked_and_streamed(family_server, tool_choice):
    llm = chat(family_server, 80).bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False)
    msg = llm.invoke(ASK)
    assert len(msg.tool_calls) == 1 and msg.response_metadata["finish_reason"] == "tool_calls"
    check_call(msg.tool_calls[0])
    chunks = list(llm.stream(ASK))
    whole = sum(chunks[1:], chunks[0])
    assert isinstance(whole, AIMessageChunk) and len(whole.tool_calls) == 1
    check_call(whole.tool_calls[0])
    assert whole.tool_calls[0]["args"] == msg.tool_calls[0]["args"]  # greedy: the same call
    fragments = [c for ch in chunks for c in ch.tool_call_chunks if c.get("args")]
    assert len(fragments) > 1  # the arguments came in fragments as generated, not in one piece


def test_tool_round_trip_with_a_tool_message(family_server):
    forced = chat(family_server, 80).bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    call = forced.invoke(ASK)
    result = ToolMessage('{"forecast": "sunny"}', tool_call_id=call.tool_calls[0]["id"])
    reply = chat(family_server, 8).bind_tools([GetWeather]).invoke(ASK + [call, result])
    assert isinstance(reply, AIMessage) and reply.response_metadata["finish_reason"] in ("length", "stop", "tool_calls")
    # the call and its result are in the prompt: the second prompt is the first one and more
    assert reply.usage_metadata["input_tokens"] > call.usage_metadata["input_tokens"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_validates(family_server, method):
    place = chat(family_server, 60).with_structured_output(Place, method=method).invoke("Name a place.")
    assert isinstance(place, Place) and len(place.name) <= 6


def test_structured_output_json_mode_is_an_object(family_server):
    # json_object bounds nothing: a random model's strings end by chance, so it gets room
    doc = chat(family_server, 700).with_structured_output(method="json_mode").invoke("Answer in JSON.")
    assert isinstance(doc, dict)
