"""OpenAI-compatible request, response, chunk and error models, and their mapping onto `SamplingParams`.

Requests are pydantic models with range checks, so a bad field is rejected once, here, with its name. They
take JSON types strictly (a boolean is true or false, never "yes" or 1; an integer is a JSON integer; an integer
is a number), and a value of another type is a 400 in OpenAI's words (`json_type_error`).
A field OpenAI defines that this server does not implement is refused with a 400 naming it (`UNSUPPORTED`),
never dropped, and so is a top-level field no one defines (a misspelt `max_token`): "Unrecognized request
argument supplied", as OpenAI's own server answers. vLLM's extensions that this server implements are read
(`guided_*`, `structured_outputs`, `allowed_token_ids`, `bad_words`, `min_tokens` ...); one it does not (say
`prompt_logprobs`) is refused like any unknown field rather than silently ignored. Responses are plain
pydantic models serialized with `model_dump_json(exclude_none=...)` by the ingress.
"""

from __future__ import annotations

import functools
import json
import time
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pagedserve.engine.core.request import SamplingParams, StructuredOutputsParams
from pagedserve.engine.errors import InvalidRequestError
from pagedserve.serve_app.tool_calls import ToolPlan

MAX_LOGPROBS = 20
# The engine tokenizes a request's bad words on its step loop, twice each, and checks them all every step:
# 20,000 held every other stream for 12 s on the demo model.
MAX_BAD_WORDS = 256


def _neutral(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in values


# OpenAI fields this server does not implement, with the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "audio": _neutral(),
    "modalities": lambda value: value is None or value == ["text"],
    "prediction": _neutral(),
    "web_search_options": _neutral(),
    "functions": lambda value: not value,  # the deprecated form of tools
    "function_call": _neutral("none", "auto"),
    "reasoning_effort": _neutral(),
    "verbosity": _neutral(),
    "service_tier": _neutral("auto", "default"),
    "store": _neutral(False),
    "moderation": _neutral(),
    # The prefix cache is in memory and automatic (OpenAI's implicit breakpoint); no lifetime is promised.
    "prompt_cache_retention": _neutral("in_memory"),
    "prompt_cache_options": lambda value: not value or value == {"mode": "implicit"},
}


UNRECOGNIZED = "Unrecognized request argument supplied"  # OpenAI's words for a field it does not define


def _refuse_unsupported(payload: Any, fields: tuple[str, ...]) -> Any:
    """`payload` without the `fields` whose values ask for nothing; a ValueError naming one that asks for more."""
    if not isinstance(payload, dict):
        return payload
    present = [name for name in fields if name in payload]
    for name in present:
        if not UNSUPPORTED[name](payload[name]):
            raise ValueError(f"{name} is not supported by this server")
    # Dropped from a copy: the request model forbids fields it does not declare.
    return {key: value for key, value in payload.items() if key not in present} if present else payload


# Errors ----------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, error_type: str, status_code: int, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=status_code)).model_dump()


# Requests --------------------------------------------------------------------------------------------


class _StrictRequest(BaseModel):
    """A request model (or a part of one) that takes JSON types as they are: a boolean only as true/false, an
    integer only as a JSON integer, a number as any JSON number, a string only as a string (pydantic's strict
    mode). Lax mode took "stream": "yes", "n": "2" and "logprobs": 1 for a boolean, where OpenAI answers 400."""

    model_config = ConfigDict(strict=True)


_KIND_OF_SCALAR = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {"a boolean": "booleans", "an integer": "integers", "a number": "numbers", "a string": "strings",
           "an object": "objects"}


def _json_kind(value: Any) -> str:
    """The JSON type of a decoded value, in OpenAI's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    return "a string" if isinstance(value, str) else "an array" if isinstance(value, list) else "an object"


def _members(annotation: Any) -> tuple[Any, ...] | None:
    """The members of a union annotation (`X | Y`, Optional), None for any other."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _one_of(kinds: list[str]) -> str:
    kinds = list(dict.fromkeys(kinds))
    return kinds[0] if len(kinds) == 1 else "one of " + ", ".join(kinds[:-1]) + " or " + kinds[-1]


def _describe(annotation: Any) -> str:
    """What a JSON value of `annotation` is, in OpenAI's words ("a boolean", "an array of strings")."""
    members = _members(annotation)
    if members is not None:  # null is left out, as OpenAI leaves it out
        return _one_of([_describe(m) for m in members if m is not type(None)])
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return _one_of([_json_kind(v) for v in typing.get_args(annotation)])
    if origin is list:
        (item,) = typing.get_args(annotation)
        inner = _describe(item)
        return "an array of " + _PLURAL.get(inner, inner.replace("an array", "arrays", 1))
    if annotation in _KIND_OF_SCALAR:
        return _KIND_OF_SCALAR[annotation]
    return "an object"  # dict[...] or a model


def _is_kind(annotation: Any, value: Any, first_item: bool = False) -> bool:
    """Whether `value`'s JSON type is one `annotation` takes (with `first_item`, a list's first item's too: which
    member of a union a list is read as, say `prompt` as token ids or as strings)."""
    members = _members(annotation)
    if members is not None:
        return any(_is_kind(m, value, first_item) for m in members)
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return any(_json_kind(v) == _json_kind(value) for v in typing.get_args(annotation))
    if origin is list:
        return isinstance(value, list) and (not first_item or not value
                                            or _is_kind(typing.get_args(annotation)[0], value[0]))
    if annotation is bool or annotation is str:
        return isinstance(value, annotation)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an integer is a number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, dict)  # dict[...] or a model


def _first_type_error(annotation: Any, value: Any, path: str) -> tuple[str, str] | None:
    """(path, message) of the first value within `value` whose JSON type `annotation` does not take there."""
    if not _is_kind(annotation, value):
        return path, f"Invalid type for '{path}': expected {_describe(annotation)}, but got {_json_kind(value)} instead."
    members = _members(annotation)
    if members is not None:  # look inside the member a value of this shape is read as
        member = next((m for m in members if _is_kind(m, value, first_item=True)),
                      next(m for m in members if _is_kind(m, value)))
        return _first_type_error(member, value, path)
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        for index, element in enumerate(value):
            if (found := _first_type_error(item, element, f"{path}[{index}]")) is not None:
                return found
    elif origin is dict:
        _, item = typing.get_args(annotation)
        for key, element in value.items():
            if (found := _first_type_error(item, element, f"{path}.{key}")) is not None:
                return found
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return json_type_error(annotation, value, path)
    return None


def json_type_error(model_cls: type[BaseModel], payload: dict[str, Any], path: str = "") -> tuple[str, str] | None:
    """(param, message) of the first field of a decoded JSON body whose JSON type the model does not take, in
    OpenAI's words: "Invalid type for 'stream': expected a boolean, but got a string instead."; None if every
    declared field's type fits (the body may still be refused for its values)."""
    if issubclass(model_cls, _SamplingFields):  # as the model reads it: a null there means the default
        payload = _without_default_nulls(model_cls, payload)
    for name, field in model_cls.model_fields.items():
        key = field.alias or name
        if key in payload:
            found = _first_type_error(field.annotation, payload[key], f"{path}.{key}" if path else key)
            if found is not None:
                return found
    return None


class StreamOptions(_StrictRequest):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of stream events: not implemented
    continuous_usage_stats: bool | None = None  # vLLM's usage in every chunk: not implemented

    @field_validator("include_obfuscation", "continuous_usage_stats")
    @classmethod
    def _not_implemented(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class JsonSchemaFormat(_StrictRequest):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_StrictRequest):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputsField(_StrictRequest):
    """vLLM's `structured_outputs` request field."""

    model_config = ConfigDict(extra="ignore")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


@functools.cache
def _defaulted_fields(model_cls: type[BaseModel]) -> frozenset[str]:
    """The fields whose default is not None (once per model class: every request asks)."""
    return frozenset(name for name, info in model_cls.model_fields.items()
                     if not info.is_required() and info.get_default(call_default_factory=False) is not None)


def _without_default_nulls(model_cls: type[BaseModel], payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` without the nulls of fields that have a default (a copy when there are some): `null` there means
    that default, as OpenAI's nullable parameters do."""
    defaulted = _defaulted_fields(model_cls)
    nulls = [key for key, value in payload.items() if value is None and key in defaulted]
    return {key: value for key, value in payload.items() if key not in nulls} if nulls else payload


class _SamplingFields(_StrictRequest):
    """Fields shared by completions and chat completions; OpenAI names, vLLM extensions. Any other top-level
    field is refused (pydantic's `extra_forbidden`, which the ingress words as OpenAI does)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, payload: Any) -> Any:
        """`null` for a field with a default means the default, as OpenAI's nullable parameters do (`"n": null`,
        `"stream": null`, `"presence_penalty": null`: clients that serialize unset options send them so); a
        required field stays required."""
        return _without_default_nulls(cls, payload) if isinstance(payload, dict) else payload

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsField | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1)  # lower served earlier; needs scheduling_policy priority

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def constraint(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint the request asks for, from whichever field names it."""
        found: list[StructuredOutputsParams] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(StructuredOutputsParams(json_object=True, param="response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            found.append(StructuredOutputsParams(json=fmt.json_schema.schema_, param="response_format"))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append(StructuredOutputsParams(**{key: value}, param=name))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            found.append(StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                                 json_object=bool(so.json_object), param="structured_outputs"))
        if len(found) > 1:
            raise InvalidRequestError(
                f"give one structured-output constraint, not {len(found)} ({', '.join(c.param for c in found)})",
                param=found[1].param)
        return found[0] if found else None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=constraint,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token prompts must not be empty")
        if isinstance(value, list) and any(isinstance(t, int) and t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of other than n is not supported (best_of {self.best_of}, n {self.n})")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a list of strings, a token list or a list of token lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        return self._sampling_params(max_tokens, self.logprobs, self.constraint())


class ToolCallFunction(_StrictRequest):
    name: str
    arguments: str


class ToolCallModel(_StrictRequest):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_StrictRequest):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallModel] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (tool call arguments decoded, as transformers' templates expect)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text_content()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise ValueError(f"tool call {call.id}: arguments are not JSON") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text_content(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class FunctionDefinition(_StrictRequest):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_StrictRequest):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_StrictRequest):
    name: str


class NamedToolChoice(_StrictRequest):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None  # a routing hint: prefix caching needs none
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported_fields(cls, payload: Any) -> Any:
        return _refuse_unsupported(payload, tuple(UNSUPPORTED))

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> "ChatCompletionRequest":
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def tool_plan(self, parser: str) -> ToolPlan:
        tools = tuple(tool.model_dump(exclude_none=True) for tool in self.tools or [])
        choice = self.tool_choice or ("auto" if tools else "none")
        if not tools or choice == "none":
            return ToolPlan("none", tools, parser=parser)
        if isinstance(choice, NamedToolChoice):
            return ToolPlan("named", tools, named=choice.function.name, parallel=self.parallel_tool_calls, parser=parser)
        return ToolPlan(choice, tools, parallel=self.parallel_tool_calls, parser=parser)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int | None, tool_constraint: StructuredOutputsParams | None = None
                           ) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        constraint = self.constraint()
        if constraint is not None and tool_constraint is not None:
            raise InvalidRequestError(f"tool_choice forces a tool call; it cannot be combined with {constraint.param}",
                                      param=constraint.param)
        return self._sampling_params(max_tokens, logprobs, constraint or tool_constraint)


class TokenizeRequest(_StrictRequest):
    """vLLM's POST /tokenize body. A field it does not declare (vLLM's `return_token_strs`, `chat_template`, a
    misspelt `add_special_token`) is refused by name, as on the completion routes, rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_StrictRequest):
    """vLLM's POST /detokenize body; other fields are refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value


# Responses -------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallModel] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    max_model_len: int | None = None
    root: str | None = None  # vLLM's: the base model's name, or a LoRA adapter's path
    parent: str | None = None  # vLLM's: a LoRA adapter's base model


class LoadLoraAdapterRequest(_StrictRequest):
    """vLLM's POST /v1/load_lora_adapter body; other fields (vLLM's `load_inplace`) are refused by name."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_StrictRequest):
    """vLLM's POST /v1/unload_lora_adapter body (its lora_int_id is accepted and not needed); other fields are
    refused by name."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
