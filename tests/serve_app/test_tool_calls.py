"""serve_app/tool_calls.py and tool_stream.py without a service: parsers, forced plans, streamed deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.tool_calls import (
    TOOL_CALL_PARSERS,
    ToolPlan,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parser_for_template,
)
from pagedserve.serve_app.tool_stream import ToolCallStream

TOOLS = (
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add"}},
)
NAMES = {"get_weather", "add"}


def test_hermes_blocks_and_the_content_around_them() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    content, calls = parse_hermes(text, NAMES)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("add", {"a": 1})]
    # An unknown function or broken JSON is no tool call: the text stays content.
    assert parse_hermes('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', NAMES) == (
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', [])
    assert parse_hermes("<tool_call>{oops</tool_call>", NAMES)[1] == []
    assert parse_hermes("plain words", NAMES) == ("plain words", [])


def test_llama3_json_and_mistral() -> None:
    content, calls = parse_llama3_json('<|python_tag|>{"name": "add", "parameters": {"a": 2}}; '
                                       '{"name": "get_weather", "parameters": {"city": "Paris"}}', NAMES)
    assert content is None and [c.name for c in calls] == ["add", "get_weather"]
    assert parse_llama3_json('{"name": "add", "parameters": {}} and more', NAMES)[1] == []
    content, calls = parse_mistral('Calling. [TOOL_CALLS][{"name": "add", "arguments": {"b": 3}}]', NAMES)
    assert content == "Calling." and json.loads(calls[0].arguments) == {"b": 3}
    assert parse_mistral("[TOOL_CALLS] not json", NAMES)[1] == []


def test_the_parser_follows_the_chat_template() -> None:
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("<|python_tag|>{{ x }}") == "llama3_json"
    assert parser_for_template("<tool_call>") == parser_for_template(None) == "hermes"
    assert set(TOOL_CALL_PARSERS) == {"hermes", "llama3_json", "mistral"}


def test_forced_plans_constrain_and_read_back() -> None:
    named = ToolPlan("named", TOOLS, named="get_weather")
    assert named.constraint.json == TOOLS[0]["function"]["parameters"] and named.constraint.param == "tool_choice"
    content, (call,) = named.read('{"city": "Oslo"}')
    assert content is None and call.name == "get_weather" and call.id.startswith("call_")

    required = ToolPlan("required", TOOLS, parallel=False)
    schema = required.constraint.json
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    good = [{"name": "get_weather", "parameters": {"city": "Rome"}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {}}], schema)  # city is required
    content, calls = required.read(json.dumps(good))
    assert content is None and calls[0].name == "get_weather"
    assert "maxItems" not in ToolPlan("required", TOOLS).constraint.json
    assert ToolPlan("auto", TOOLS).constraint is None and ToolPlan("none", TOOLS).read("hi") == ("hi", [])


def test_requests_map_tool_choice_and_refuse_mixtures() -> None:
    body = oai.ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}], "tools": list(TOOLS),
        "tool_choice": {"type": "function", "function": {"name": "add"}}})
    plan = body.tool_plan("hermes")
    assert plan.mode == "named" and plan.named == "add"
    assert body.to_sampling_params(8, plan.constraint).structured_outputs.param == "tool_choice"
    assert oai.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": list(TOOLS)}).tool_plan("hermes").mode == "auto"
    with pytest.raises(ValueError, match="tool_choice names 'nope'"):
        oai.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": list(TOOLS),
                                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    with pytest.raises(ValueError, match="audio is not supported"):
        oai.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "audio": {}})
    ok = oai.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "store": False,
                                                   "modalities": ["text"], "service_tier": "auto"})
    assert ok.constraint() is None


def test_streams_name_the_call_first_then_its_arguments() -> None:
    stream = ToolCallStream(ToolPlan("named", TOOLS, named="add"))
    first, reason = stream.feed('{"a"', None)
    assert first.tool_calls[0].function.name == "add" and first.tool_calls[0].id and reason is None
    second, reason = stream.feed(": 1}", "stop")
    assert second.tool_calls[0].function.arguments == ": 1}" and second.tool_calls[0].id is None
    assert reason == "tool_calls"


def test_auto_streams_hold_back_only_what_may_be_a_call() -> None:
    plain = ToolCallStream(ToolPlan("auto", TOOLS, parser="hermes"))
    delta, _ = plain.feed("Hello", None)
    assert delta.content == "Hello"
    held = ToolCallStream(ToolPlan("auto", TOOLS, parser="hermes"))
    assert held.feed("<tool", None) == (None, None)
    assert held.feed('_call>{"name": "add", "arguments": {}}', None) == (None, None)
    delta, reason = held.feed("</tool_call>", "stop")
    assert delta.tool_calls[0].function.name == "add" and reason == "tool_calls"
    broken = ToolCallStream(ToolPlan("auto", TOOLS, parser="hermes"))
    broken.feed("<tool_call>{", None)
    delta, reason = broken.feed("", "length")
    assert delta.content == "<tool_call>{" and reason == "length"
