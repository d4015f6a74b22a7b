"""Structured outputs, tool calls, logit_bias and refusals through the real service, with the official client.

The model is a tiny random Llama with a byte-level BPE tokenizer: random weights never choose to stop, so
the schemas bound what they allow (integer ranges, string lengths, item counts) and every answer that
parses proves the grammar. The engine's cache is small, so a batch of 32 waits in the router's queue; the
router reserves each request's whole demand, so the engine itself does not preempt here
(tests/engine/core/test_structured_outputs.py forces preemption under grammars).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from ray import serve  # noqa: E402
from ray_harness import build_app_with, deployed  # noqa: E402

APP = "structured"
# 40 blocks of 16 tokens for 32 requests of ~30 prompt + up to 96 output tokens: most wait their turn.
ENGINE_ARGS = {"num_blocks": 40, "block_size": 16, "max_model_len": 512, "max_num_seqs": 64}


def _object(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties), **extra}


SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}
SHORT = {"type": "string", "maxLength": 6}
SCHEMAS = [
    _object({"a": SMALL_INT}),
    _object({"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _object({"ok": {"type": "boolean"}}),
    _object({"color": {"enum": ["red", "green", "blue"]}}),
    _object({"tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3}}),
    _object({"grid": {"type": "array", "items": {"type": "array", "items": SMALL_INT, "minItems": 2, "maxItems": 2},
                      "minItems": 1, "maxItems": 2}}),
    _object({"inner": _object({"deep": _object({"v": SMALL_INT})})}),
    _object({"a": SMALL_INT, "b": SHORT}, required=["a"]),
    _object({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -5, "maximum": 5}}),
    _object({"level": {"enum": [1, 2, 3, None]}}),
    _object({"maybe": {"anyOf": [SMALL_INT, {"type": "null"}]}}),
    _object({"choice": {"oneOf": [_object({"cat": SHORT}), _object({"dog": SMALL_INT})]}}),
    _object({"p": {"$ref": "#/$defs/point"}}, **{"$defs": {"point": _object({"x": SMALL_INT, "y": SMALL_INT})}}),
    _object({"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2}},
            **{"$defs": {"item": _object({"id": SMALL_INT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}}),
    _object({"empty": {"type": "array", "items": SMALL_INT, "maxItems": 0}}),
    _object({"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
    _object({"flags": _object({"a": {"type": "boolean"}, "b": {"type": "boolean"}})}),
    _object({"n": {"type": "integer", "enum": [7, 11, 13]}, "s": {"enum": ["lo", "hi"]}}),
    _object({"pair": {"type": "array", "prefixItems": [SMALL_INT, {"enum": ["u", "v"]}], "items": False,
                      "minItems": 2}}),
    _object({"note": {"type": "string", "minLength": 1, "maxLength": 3}, "ok": {"type": "boolean"}}),
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": _object({"city": {"enum": ["Paris", "Oslo"]},
                                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}})}},
    {"type": "function", "function": {"name": "add", "parameters": _object({"a": SMALL_INT, "b": SMALL_INT})}},
]


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {"model": tiny_model_path, "num_replicas": 1, **ENGINE_ARGS,
            "router": {"stats_period_s": 0.5, "max_queued_requests": 256}}
    with deployed(ray_cluster, APP, build_app_with(args)) as base:
        yield base


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema: dict, index: int = 0) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema, "strict": True}}


def _messages(text: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_twenty_schemas_alone_streamed_and_not(client) -> None:
    for index, schema in enumerate(SCHEMAS):
        reply = client.chat.completions.create(model=None, messages=_messages(f"schema {index}"), max_tokens=96,
                                               temperature=1.0, seed=index, response_format=_schema_format(schema, index))
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        stream = client.chat.completions.create(model=None, messages=_messages(f"again {index}"), max_tokens=96,
                                                stream=True, response_format=_schema_format(schema, index))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        jsonschema.validate(json.loads(text), schema)


def test_a_batch_of_32_mixed_with_free_requests(service) -> None:
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=300) as aclient:
            async def one(index: int):
                schema = SCHEMAS[index % len(SCHEMAS)] if index % 2 == 0 else None
                kwargs = {"response_format": _schema_format(schema, index)} if schema else {}
                if index % 4 == 0:  # a quarter streamed
                    stream = await aclient.chat.completions.create(
                        model=None, messages=_messages(f"mixed batch {index} " * 2), max_tokens=96, temperature=1.0,
                        seed=index, stream=True, **kwargs)
                    return schema, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                reply = await aclient.chat.completions.create(
                    model=None, messages=_messages(f"mixed batch {index} " * 2), max_tokens=96, temperature=1.0,
                    seed=index, **kwargs)
                return schema, reply.choices[0].message.content
            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    for schema, text in results:
        if schema is not None:
            jsonschema.validate(json.loads(text), schema)
    stats = serve.get_deployment_handle("EngineReplica", APP).get_stats.remote().result()
    assert stats.num_free_blocks == stats.num_total_blocks  # every request's blocks came back


def test_vllm_fields_and_the_clients_parse(client) -> None:
    reply = client.chat.completions.create(model=None, messages=_messages(), max_tokens=20,
                                           extra_body={"guided_choice": ["alpha", "beta"]})
    assert reply.choices[0].message.content in ("alpha", "beta")
    reply = client.completions.create(model=None, prompt="Numbers:", max_tokens=20,
                                      extra_body={"guided_regex": "[0-9]{4}"})
    assert len(reply.choices[0].text) == 4 and reply.choices[0].text.isdigit()
    reply = client.completions.create(model=None, prompt="JSON:", max_tokens=60,
                                      extra_body={"structured_outputs": {"json": SCHEMAS[3]}})
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMAS[3])

    class Answer(BaseModel):
        verdict: bool
        score: int = Field(ge=0, le=9)

    parsed = client.chat.completions.parse(model=None, messages=_messages("Judge"), max_tokens=40,
                                           response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer)


def test_required_and_named_tools_always_give_parseable_calls(client) -> None:
    names = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for seed in range(6):
        # One call (parallel_tool_calls false): random weights would never close an open-ended array of calls.
        reply = client.chat.completions.create(model=None, messages=_messages("Use a tool"), max_tokens=120,
                                               temperature=1.0, seed=seed, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), names[call.function.name])
        named = {"type": "function", "function": {"name": "add"}}
        reply = client.chat.completions.create(model=None, messages=_messages("Add"), max_tokens=60,
                                               temperature=1.0, seed=seed, tools=TOOLS, tool_choice=named)
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), names["add"])
    # Streamed: OpenAI-shaped deltas that add up to the same kind of calls.
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        stream = client.chat.completions.create(model=None, messages=_messages("Weather"), max_tokens=120,
                                                tools=TOOLS, tool_choice=tool_choice, stream=True,
                                                parallel_tool_calls=False)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for delta in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            jsonschema.validate(json.loads(entry["arguments"]), names[entry["name"]])
    # A conversation that carries the calls and their results goes on.
    history = [*_messages("Weather in Oslo?"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model=None, messages=history, max_tokens=8, tools=TOOLS)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_logit_bias_bans_and_forces(client, tiny_model_path) -> None:
    """The service's greedy tokens under a bias equal the offline engine's, which shows the ban."""
    from pagedserve import LLM, SamplingParams

    llm = LLM(tiny_model_path, num_blocks=16, device="cpu")
    try:
        prompt = [5, 17, 42, 99]
        free = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0].outputs[0]
        banned = free.token_ids[0]
        offline = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logit_bias={banned: -100}),
                               use_tqdm=False)[0].outputs[0]
    finally:
        llm.engine.shutdown()
    assert banned not in offline.token_ids
    reply = client.completions.create(model=None, prompt=prompt, max_tokens=4, temperature=0,
                                      logit_bias={str(banned): -100})
    assert reply.choices[0].text == offline.text
    forced = client.completions.create(model=None, prompt="Bias", max_tokens=5, temperature=1.0, seed=3,
                                       logit_bias={"77": 100}, logprobs=0)
    detokenized = httpx.post(f"{client.base_url.copy_with(path='/' + APP + '/detokenize')}",
                             json={"tokens": [77]}, timeout=30).json()["prompt"]
    assert forced.choices[0].logprobs.tokens == [detokenized] * 5


@pytest.mark.parametrize("field, value", [("audio", {"voice": "alloy", "format": "wav"}),
                                          ("modalities", ["text", "audio"]), ("prediction", {"type": "content"}),
                                          ("reasoning_effort", "high"), ("store", True),
                                          ("functions", [{"name": "f"}])])
def test_openai_fields_not_implemented_are_refused_by_name(service, field, value) -> None:
    response = httpx.post(f"{service}/v1/chat/completions", timeout=30,
                          json={"messages": _messages(), "max_tokens": 2, field: value})
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, "response_format"),
    ({"guided_regex": "((("}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
])
def test_bad_constraints_are_400s_and_the_service_goes_on(service, body, param) -> None:
    response = httpx.post(f"{service}/v1/chat/completions", timeout=30,
                          json={"messages": _messages(), "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.post(f"{service}/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=30).status_code == 200


def test_a_lone_surrogate_is_a_400_with_an_openai_body(service) -> None:
    for path, body in (("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}')):
        response = httpx.post(f"{service}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(["messages", "prompt", "max_tokens", "temperature", "n", "logit_bias", "response_format",
                           "tools", "tool_choice", "stop", "seed", "guided_json", "logprobs", "stream", "top_p"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(_fields, _json, max_size=5) | _json)
def test_fuzzed_bodies_never_get_a_5xx(service, path, body) -> None:
    payload = json.dumps(body, ensure_ascii=True).encode()
    response = httpx.post(f"{service}{path}", content=payload, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert "error" in response.json()


def test_the_service_still_answers_after_the_fuzzing(service) -> None:
    response = httpx.post(f"{service}/v1/completions", json={"prompt": "still", "max_tokens": 3}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None
