"""Tool formats (text/tool_format.py): Meta's Llama 3.1 JSON tool calling against llama-models,
the oracle (prompt ids of a dialog with tools, decode_assistant_message of answers); the generic
format for models without tool syntax; OpenAI's streamed tool-call deltas; parallel_tool_calls."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from families import llama3_tokenizer_path
from llama_demo.text.chat_format import Llama2ChatFormat, Llama3ChatFormat, Message
from llama_demo.text.tool_format import GenericTools, MetaJsonTools, ToolCallStream, tool_format_for
from llama_demo.text.tokenizer import load_tokenizer

SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "object", "description": "The number of songs to return"},
        "genre": {"type": "object", "description": "The genre of the songs to return"}}, "required": ["n"]}}}


def meta_example() -> str:
    """The input prompt of prompt_format.md's "JSON based tool calling" (llama-models' docs)."""
    import llama_models

    md = (Path(llama_models.__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    section = md[md.index("## JSON based tool calling"):]
    return section.split("```\n", 2)[1].removesuffix("\n")  # the line break before the closing fence


def test_llama31_tool_prompt_is_metas_documented_prompt(monkeypatch):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    monkeypatch.setattr(MetaJsonTools, "today", staticmethod(lambda: "21 September 2024"))
    tok = load_tokenizer(llama3_tokenizer_path())
    meta_tok = MetaTokenizer(llama3_tokenizer_path())
    fmt = Llama3ChatFormat(tok)
    tools, native = tool_format_for(fmt)
    assert isinstance(tools, MetaJsonTools) and native
    dialog = [Message("system", "You are a helpful assistant."), Message("user", "Use tools to get latest trending songs")]
    ours = fmt.encode_dialog(tools.prepare(dialog, [SONGS], native))
    assert ours == meta_tok.encode(meta_example(), bos=False, eos=False, allowed_special="all")
    # a round trip: the call (as llama-models writes it, ending with <|eom_id|>) and its result
    call = {"id": "c1", "type": "function", "function": {"name": "trending_songs", "arguments": '{"n": "10"}'}}
    dialog += [Message("assistant", "", tool_calls=[call]), Message("tool", '["song a"]', tool_call_id="c1")]
    ours = fmt.encode_dialog(tools.prepare(dialog, [SONGS], native))
    shown = tools.prepare(dialog[:2], [SONGS], native)
    meta = MetaChatFormat(meta_tok).encode_dialog_prompt(
        [RawMessage(role=m.role, content=m.content) for m in shown]
        + [RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                      tool_calls=[ToolCall(call_id="c1", tool_name="trending_songs", arguments={"n": "10"})]),
           RawMessage(role="tool", content='["song a"]')]).tokens
    assert ours == meta


ANSWERS = [
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n        "genre": "all"\n    }\n}<|eom_id|>',
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}<|eot_id|>',
    '<function=get_weather>{"city": "Köln"}</function><|eot_id|>',
    '[get_weather(city="Rome", days=3)]<|eot_id|>',
    'The weather is fine.<|eot_id|>',
    '{"answer": 42}<|eot_id|>',
    '  {"type": "function", "name": "f", "parameters": {}}<|eom_id|>',
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_llama31_answers_decode_as_llama_models_decodes_them(answer):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta_tok = MetaTokenizer(llama3_tokenizer_path())
    ids = meta_tok.encode(answer, bos=False, eos=False, allowed_special="all")
    want = MetaChatFormat(meta_tok).decode_assistant_message(ids[:-1], StopReason.end_of_turn)
    tok = load_tokenizer(llama3_tokenizer_path())
    got = MetaJsonTools().parse(tok.decode(ids[:-1]))  # our text: special tokens are not rendered
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got or []] == \
        [(c.tool_name, c.arguments) for c in want.tool_calls]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}]


def test_generic_format_shows_tools_and_keeps_llama2_turns_alternating():
    from conftest import LLAMA2_TOKENIZER

    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("no Llama 2 tokenizer")
    fmt = Llama2ChatFormat(load_tokenizer(LLAMA2_TOKENIZER))
    tools, native = tool_format_for(fmt)
    assert isinstance(tools, GenericTools) and not native
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    dialog = [Message("user", "weather?"), Message("assistant", "", tool_calls=[call]),
              Message("tool", "sunny", tool_call_id="c1"), Message("user", "and tomorrow?")]
    shown = tools.prepare(dialog, WEATHER, native)
    text = fmt.tokenizer.decode(fmt.encode_dialog(shown))
    assert '"get_weather"' in text and "To call tools" in text
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in text
    assert "Result of get_weather: sunny\n\nand tomorrow?" in text
    assert [c["function"]["name"] for c in tools.parse(json.dumps(
        {"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]}))] == ["a", "b"]
    assert tools.parse("It is sunny.") is None and tools.parse('{"city": "x"}') is None


@pytest.mark.parametrize("fmt,text", [
    (GenericTools(), '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Pa}r\\"is","d":[1,{"x":2}]}},'
                     '{"name":"g","arguments":{}}]}'),
    (MetaJsonTools(), '{"type": "function", "name": "get_weather", "parameters": {"city": "Pa}r\\"is", "d": [1, {"x": 2}]}}'),
])
def test_streamed_calls_rebuild_the_whole_answers_calls(fmt, text):
    for step in (1, 3, 7):
        stream = ToolCallStream(fmt)
        deltas = [d for i in range(0, len(text), step) for d in stream.feed(text[i:i + step])] + stream.finish()
        assert deltas[0][0] == "call" and deltas[0][3] == "get_weather"  # the name comes first, alone
        assert not [d for d in deltas if d[0] == "content"]
        args: dict[int, str] = {}
        for d in deltas:
            if d[0] == "arguments":
                args[d[1]] = args.get(d[1], "") + d[2]
        whole = fmt.parse(text)
        assert [json.loads(a) for a in args.values()] == [json.loads(c["function"]["arguments"]) for c in whole]
        assert len([d for d in deltas if d[0] == "arguments"]) > 1 or step == 7  # in fragments


def test_text_streams_as_content_and_one_call_when_parallel_is_off():
    stream = ToolCallStream(GenericTools())
    assert [d for ch in "Sunny {x}" for d in stream.feed(ch)] + stream.finish() == \
        [("content", c) for c in "Sunny {x}"]
    two = '{"tool_calls":[{"name":"a","arguments":{}},{"name":"b","arguments":{}}]}'
    stream = ToolCallStream(GenericTools(), parallel=False)
    deltas = stream.feed(two) + stream.finish()
    assert [d[3] for d in deltas if d[0] == "call"] == ["a"]
    schema = GenericTools().call_schema([WEATHER[0]["function"]], parallel=False)
    assert schema["properties"]["tool_calls"]["maxItems"] == 1
