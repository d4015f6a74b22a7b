"""Tool calling: what a request's `tools` and `tool_choice` ask of the engine, and reading tool calls back.

- `tool_choice: "none"` (or no tools): plain text.
- a named function: the completion is the function's arguments, held to its `parameters` schema by the
  grammar; the tool call is that function with the completion as `arguments`.
- `"required"`: the completion is a JSON array of `{"name": ..., "parameters": {...}}` objects, one of the
  tools each (one item when `parallel_tool_calls` is false), held to that shape by the grammar.
- `"auto"`: the model chooses; its text is read with the parser of the model's tool-call format
  (`TOOL_CALL_PARSERS`: Hermes/Qwen `<tool_call>` JSON, Llama-3 JSON, Mistral `[TOOL_CALLS]`), chosen by
  the `tool_call_parser` setting or from the chat template. Text that is no tool call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.core.request import StructuredOutputsParams


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def with_id(self) -> "ToolCall":
        return self if self.id else ToolCall(self.name, self.arguments, f"call_{uuid.uuid4().hex[:24]}")


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _arguments_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _calls_from_objects(objects: list[Any], names: set[str], argument_keys: tuple[str, ...]) -> list[ToolCall] | None:
    """Tool calls from decoded JSON objects `{"name": ..., <argument key>: {...}}`; None if any is not one."""
    calls = []
    for item in objects:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = next((item[key] for key in argument_keys if key in item), {})
        calls.append(ToolCall(item["name"], _arguments_text(arguments)))
    return calls or None


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, in order, separated by whitespace or `;`; None if anything else is there."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] == ";"):
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _content_before_calls(before: str, after: str) -> str | None:
    """The content of a text with tool calls: what came before the first call (its trailing whitespace dropped;
    a stream sends it as it comes, so its start is kept as written), then what is left after the calls."""
    content = before.rstrip() + after.rstrip() if before.strip() else after.strip()
    return content if content.strip() else None


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen)."""
    calls = []
    for block in _HERMES.findall(text):
        values = _json_values(block)
        found = _calls_from_objects(values or [], names, ("arguments", "parameters"))
        if found is None:
            return text, []
        calls += found
    if not calls:
        return text, []
    first = text.index("<tool_call>")
    return _content_before_calls(text[:first], _HERMES.sub("", text[first:])), calls


def parse_llama3_json(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The whole text is `{"name": ..., "parameters": {...}}` objects, `;`-separated (Llama 3.1+)."""
    body = text.strip().removeprefix("<|python_tag|>")
    values = _json_values(body)
    found = _calls_from_objects(values or [], names, ("parameters", "arguments"))
    return (None, found) if found else (text, [])


def parse_mistral(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral)."""
    marker = text.find("[TOOL_CALLS]")
    if marker < 0:
        return text, []
    values = _json_values(text[marker + len("[TOOL_CALLS]"):])
    if not values or not isinstance(values[0], list):
        return text, []
    found = _calls_from_objects(values[0], names, ("arguments", "parameters"))
    if not found:
        return text, []
    return _content_before_calls(text[:marker], ""), found


TOOL_CALL_PARSERS: dict[str, Callable[[str, set[str]], tuple[str | None, list[ToolCall]]]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}
# The text that starts a tool call in each format: a stream holds its content back while it may be one.
TOOL_CALL_MARKERS = {"hermes": "<tool_call>", "llama3_json": "{", "mistral": "[TOOL_CALLS]"}


def parser_for_template(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model, Hermes when it shows none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask: a constraint for the engine, and how to read the completion back."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: tuple[dict[str, Any], ...]
    named: str | None = None
    parallel: bool = True
    parser: str = "hermes"

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}

    @property
    def constraint(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.named)
            return StructuredOutputsParams(json=_parameters(tool), param="tool_choice")
        if self.mode == "required":
            item = {"anyOf": [
                {"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                  "parameters": _parameters(t)},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for t in self.tools]}
            schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema, param="tool_choice")
        return None

    @property
    def stream_marker(self) -> str | None:
        """In auto mode, the text whose start makes a stream hold its content back."""
        return TOOL_CALL_MARKERS[self.parser] if self.mode == "auto" else None

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished completion."""
        if self.mode == "named":
            return None, [ToolCall(self.named or "", text).with_id()]
        if self.mode == "required":
            values = _json_values(text)
            found = _calls_from_objects(values[0] if values and isinstance(values[0], list) else [], self.names,
                                        ("parameters",))
            return (None, [c.with_id() for c in found]) if found else (text, [])
        if self.mode == "auto":
            content, calls = TOOL_CALL_PARSERS[self.parser](text, self.names)
            return content, [c.with_id() for c in calls]
        return text, []
