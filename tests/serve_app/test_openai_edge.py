"""The edge of the HTTP API without a cluster: what `OpenAIIngress.parse_body` makes of a body (the 400 and the
field it names), and the bodies of the routes' FastAPI app for requests no route takes (unknown path, wrong
method). Found by probing a running `make serve` as an OpenAI-client user would."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*was never awaited:RuntimeWarning")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.requests import Request  # noqa: E402

from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.serve_app import openai_protocol as oai  # noqa: E402
from pagedserve.serve_app.api_errors import APIError  # noqa: E402
from pagedserve.serve_app.ingress import OpenAIIngress, fastapi_app  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hi"}]


def ingress() -> OpenAIIngress:
    edge = OpenAIIngress.__new__(OpenAIIngress)  # parse_body reads only the body limit
    edge.args = ServeArgs()
    return edge


def http_request(body: bytes, headers: dict[str, str] | None = None) -> Request:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw_headers,
             "query_string": b""}
    return Request(scope, receive)


def parse(payload: dict[str, Any], model_cls: type = oai.ChatCompletionRequest) -> Any:
    request = http_request(json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return asyncio.run(ingress().parse_body(request, model_cls))


def refusal(payload: dict[str, Any], model_cls: type = oai.ChatCompletionRequest) -> APIError:
    with pytest.raises(APIError) as error:
        parse(payload, model_cls)
    assert error.value.status_code == 400
    return error.value


@pytest.mark.parametrize("field, value", [
    ("moderation", {"model": "omni-moderation-latest"}),
    ("prompt_cache_retention", "24h"),
    ("prompt_cache_options", {"ttl": "30m"}),
])
def test_openai_chat_fields_this_server_does_not_implement_are_refused_by_name(field: str, value: Any) -> None:
    error = refusal({"messages": MESSAGES, field: value})
    assert error.param == field and field in error.message


@pytest.mark.parametrize("field, value", [("moderation", None), ("prompt_cache_retention", "in_memory"),
                                          ("prompt_cache_retention", None), ("prompt_cache_options", None),
                                          ("prompt_cache_options", {"mode": "implicit"})])
def test_values_that_ask_for_what_the_server_does_are_accepted(field: str, value: Any) -> None:
    parse({"messages": MESSAGES, field: value})


@pytest.mark.parametrize("model_cls, base", [(oai.ChatCompletionRequest, {"messages": MESSAGES}),
                                             (oai.CompletionRequest, {"prompt": "Hi"})])
@pytest.mark.parametrize("field", ["max_token", "prompt_logprobs", "truncate_prompt_tokens"])
def test_a_field_no_one_defines_is_refused_as_openai_refuses_it(model_cls: type, base: dict[str, Any],
                                                                field: str) -> None:
    """A misspelt field (or a vLLM extension this server lacks) was ignored: `max_token` 5 gave a full-length
    answer. OpenAI's server answers 400 "Unrecognized request argument supplied"; so does this one."""
    error = refusal({**base, field: 5}, model_cls)
    assert error.param == field
    assert error.message == f"Unrecognized request argument supplied: {field}"
    assert error.error_type == "invalid_request_error"


@pytest.mark.parametrize("model_cls, base, field", [
    (oai.TokenizeRequest, {"prompt": "Hi"}, "add_special_token"),  # misspelt: the specials were still added
    (oai.TokenizeRequest, {"prompt": "Hi"}, "return_token_strs"),  # vLLM's, not implemented: no strings came back
    (oai.DetokenizeRequest, {"tokens": [1]}, "skip_special_tokens"),
    (oai.LoadLoraAdapterRequest, {"lora_name": "a", "lora_path": "/a"}, "load_inplace"),
    (oai.UnloadLoraAdapterRequest, {"lora_name": "a"}, "lora_nam"),
])
def test_the_vllm_routes_refuse_a_field_they_do_not_define(model_cls: type, base: dict[str, Any], field: str) -> None:
    """/tokenize, /detokenize and the LoRA routes ignored fields they do not declare, where the completion routes
    refuse them (the README: honoured or refused, never ignored); they answer the same 400 now."""
    error = refusal({**base, field: True}, model_cls)
    assert (error.param, error.message) == (field, f"Unrecognized request argument supplied: {field}")


@pytest.mark.parametrize("model_cls, body, param, message", [
    (oai.LoadLoraAdapterRequest, {"lora_name": "a", "lora_path": 5}, "lora_path",
     "expected a string, but got an integer instead."),
    (oai.UnloadLoraAdapterRequest, {"lora_name": "a", "lora_int_id": "1"}, "lora_int_id",
     "expected an integer, but got a string instead."),
    (oai.TokenizeRequest, {"prompt": "Hi", "add_special_tokens": "false"}, "add_special_tokens",
     "expected a boolean, but got a string instead."),
])
def test_the_vllm_routes_take_json_types_strictly(model_cls: type, body: dict[str, Any], param: str,
                                                  message: str) -> None:
    error = refusal(body, model_cls)
    assert (error.param, error.message) == (param, f"Invalid type for '{param}': {message}")


def test_what_vllm_clients_send_to_its_routes_is_accepted() -> None:
    assert parse({"lora_name": "a", "lora_int_id": 3}, oai.UnloadLoraAdapterRequest).lora_name == "a"
    assert parse({"lora_name": "a", "lora_path": "/a"}, oai.LoadLoraAdapterRequest).lora_path == "/a"
    assert parse({"model": "m", "messages": MESSAGES, "add_generation_prompt": False}, oai.TokenizeRequest).messages
    assert parse({"model": "m", "tokens": [1, 2]}, oai.DetokenizeRequest).tokens == [1, 2]


def test_an_unsupported_openai_field_asking_for_nothing_is_accepted_and_one_unknown_to_completions_refused() -> None:
    """`store: false` on a chat request is OpenAI's and asks for nothing: accepted (dropped before the model
    forbids undeclared fields). The completions API does not define it: refused as unrecognized."""
    assert parse({"messages": MESSAGES, "store": False, "max_tokens": 3}).max_tokens == 3
    error = refusal({"prompt": "Hi", "store": False}, oai.CompletionRequest)
    assert error.param == "store" and "Unrecognized" in error.message


def test_stream_obfuscation_is_refused_and_its_absence_accepted() -> None:
    error = refusal({"messages": MESSAGES, "stream": True, "stream_options": {"include_obfuscation": True}})
    assert error.param == "stream_options" and "include_obfuscation" in error.message
    body = parse({"messages": MESSAGES, "stream": True,
                  "stream_options": {"include_obfuscation": False, "include_usage": True}})
    assert body.include_usage_in_stream


def test_continuous_usage_stats_is_refused_not_ignored() -> None:
    """vLLM's stream_options.continuous_usage_stats (usage in every chunk) was accepted and dropped: a client
    counting tokens from each chunk got none. It is refused by name; false asks for nothing and is accepted."""
    for model_cls, base in ((oai.ChatCompletionRequest, {"messages": MESSAGES}), (oai.CompletionRequest, {"prompt": "x"})):
        error = refusal({**base, "stream": True, "stream_options": {"continuous_usage_stats": True}}, model_cls)
        assert error.param == "stream_options" and "continuous_usage_stats" in error.message
        assert parse({**base, "stream": True, "stream_options": {"continuous_usage_stats": False}},
                     model_cls).stream_options.continuous_usage_stats is False


CHAT, COMPLETION = (oai.ChatCompletionRequest, {"messages": MESSAGES}), (oai.CompletionRequest, {"prompt": "Hi"})


@pytest.mark.parametrize("request_type, fields, param, message", [
    (CHAT, {"stream": "yes"}, "stream", "expected a boolean, but got a string instead."),
    (CHAT, {"stream": 1}, "stream", "expected a boolean, but got an integer instead."),
    (CHAT, {"n": "2"}, "n", "expected an integer, but got a string instead."),
    (CHAT, {"n": 2.0}, "n", "expected an integer, but got a decimal number instead."),
    (CHAT, {"temperature": "0.5"}, "temperature", "expected a number, but got a string instead."),
    (CHAT, {"temperature": True}, "temperature", "expected a number, but got a boolean instead."),
    (CHAT, {"logprobs": 1}, "logprobs", "expected a boolean, but got an integer instead."),
    (CHAT, {"seed": "7"}, "seed", "expected an integer, but got a string instead."),
    (CHAT, {"max_tokens": "16"}, "max_tokens", "expected an integer, but got a string instead."),
    (CHAT, {"logit_bias": {"123": "5"}}, "logit_bias.123", "expected a number, but got a string instead."),
    (CHAT, {"stop": ["a", 1]}, "stop[1]", "expected a string, but got an integer instead."),
    (CHAT, {"stop": 5}, "stop", "expected one of a string or an array of strings, but got an integer instead."),
    (CHAT, {"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage",
     "expected a boolean, but got a string instead."),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "expected one of a string or an array of objects, but got an integer instead."),
    (CHAT, {"tool_choice": 1}, "tool_choice", "expected one of a string or an object, but got an integer instead."),
    (CHAT, {"parallel_tool_calls": "false"}, "parallel_tool_calls", "expected a boolean, but got a string instead."),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": 1}}},
     "response_format.json_schema.strict", "expected a boolean, but got an integer instead."),
    (COMPLETION, {"echo": "false"}, "echo", "expected a boolean, but got a string instead."),
    (COMPLETION, {"logprobs": True}, "logprobs", "expected an integer, but got a boolean instead."),
    (COMPLETION, {"prompt": [1, "2"]}, "prompt[1]", "expected an integer, but got a string instead."),
    (COMPLETION, {"prompt": [[1], [2, 3.5]]}, "prompt[1][1]", "expected an integer, but got a decimal number instead."),
    (COMPLETION, {"prompt": 5}, "prompt", "expected one of a string, an array of integers, an array of strings or an "
                                          "array of arrays of integers, but got an integer instead."),
    (COMPLETION, {"ignore_eos": "true"}, "ignore_eos", "expected a boolean, but got a string instead."),
    (COMPLETION, {"allowed_token_ids": ["1"]}, "allowed_token_ids[0]", "expected an integer, but got a string instead."),
])
def test_a_value_of_the_wrong_json_type_is_refused_as_openai_refuses_it(request_type: tuple, fields: dict[str, Any],
                                                                       param: str, message: str) -> None:
    """Pydantic's lax mode took "stream": "yes" for true, "n": "2" for 2 and "logprobs": 1 for true. OpenAI
    answers 400 "Invalid type for 'stream': expected a boolean, but got a string instead."; so does this
    server, naming the field's path (as OpenAI does, "messages[0].content")."""
    model_cls, base = request_type
    error = refusal({**base, **fields}, model_cls)
    assert (error.param, error.message) == (param, f"Invalid type for '{param}': {message}")
    assert error.error_type == "invalid_request_error"


@pytest.mark.parametrize("request_type, fields", [
    (CHAT, {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": -1, "repetition_penalty": 2}),
    (CHAT, {"stop": "x", "seed": 7, "n": 2, "logit_bias": {"123": 5, "7": -2.5}, "max_tokens": 8}),
    (CHAT, {"stop": ["x", "y"], "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
            "top_logprobs": 2}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": False}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                       "strict": True}}}),
    (CHAT, {"response_format": {"type": "json_object"}, "stop": None, "seed": None, "temperature": None}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "content": "1", "tool_call_id": "c1"}]}),
    (COMPLETION, {"prompt": ["Hi", "there"], "logprobs": 2, "echo": False, "best_of": 1}),
    (COMPLETION, {"prompt": [1, 2, 3], "guided_choice": ["a", "b"], "min_tokens": 1}),
    (COMPLETION, {"prompt": [[1, 2], [3]], "structured_outputs": {"json": {"type": "object"}}}),
    (COMPLETION, {"guided_json": '{"type": "object"}', "allowed_token_ids": [1, 2], "bad_words": ["x"]}),
])
def test_what_clients_send_in_its_json_types_is_accepted(request_type: tuple, fields: dict[str, Any]) -> None:
    """Strict about JSON types, not about what OpenAI takes: an integer is a number ("temperature": 1), `stop`
    a string or a list, `prompt` any of its four forms, `tool_choice` a string or an object."""
    model_cls, base = request_type
    parse({**base, **fields}, model_cls)


def test_every_chat_parameter_of_the_openai_client_is_implemented_or_refused() -> None:
    """A field the installed client can send is one the server reads or one `UNSUPPORTED` refuses; a new
    OpenAI field is not silently ignored."""
    openai = pytest.importorskip("openai")
    from openai.resources.chat.completions import Completions

    transport = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    sent = set(inspect.signature(Completions.create).parameters) - transport
    known = set(oai.ChatCompletionRequest.model_fields) | set(oai.UNSUPPORTED)
    assert sent <= known, f"openai {openai.__version__} sends {sorted(sent - known)}, which the server ignores"


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405),
                                                  ("POST", "/v1/models", 405), ("GET", "/v1/nope", 404),
                                                  ("POST", "/v1/embeddings", 404)])
def test_no_route_answers_with_an_openai_error_body(method: str, path: str, status: int) -> None:
    response = TestClient(fastapi_app).request(method, path, json={})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a":', "}")])
def test_a_body_nested_past_the_json_decoders_depth_is_a_400(opener: str, closer: str) -> None:
    depth = 100_000  # 600 KB: under the body limit, far past the decoder's recursion limit
    body = ('{"messages": [{"role": "user", "content": "Hi"}], "metadata": ' + opener * depth + "1" + closer * depth
            + "}").encode()
    with pytest.raises(APIError) as error:
        asyncio.run(ingress().parse_body(http_request(body), oai.ChatCompletionRequest))
    assert error.value.status_code == 400 and "nested" in error.value.message


def test_a_body_nested_past_the_limit_is_a_400_before_it_reaches_a_replica() -> None:
    """980 levels decode, but pickling the request for the replica then raised RecursionError (a 503)."""
    def schema(depth: int) -> dict[str, Any]:
        return {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": json.loads('{"type": "array", "items": ' * depth + "{}" + "}" * depth)}}}

    with pytest.raises(APIError) as error:
        parse(schema(490))
    assert error.value.status_code == 400 and "nested" in error.value.message
    assert parse(schema(40)).response_format.json_schema.schema_["type"] == "array"


def test_bad_words_are_bounded() -> None:
    """20,000 bad words held the engine's step loop (and every other stream) for 12 s while it tokenized them."""
    words = [f"w{i}" for i in range(oai.MAX_BAD_WORDS + 1)]
    for model_cls, base in ((oai.ChatCompletionRequest, {"messages": MESSAGES}), (oai.CompletionRequest, {"prompt": "x"})):
        error = refusal({**base, "bad_words": words}, model_cls)
        assert error.param == "bad_words" and str(oai.MAX_BAD_WORDS) in error.message
        assert parse({**base, "bad_words": words[:-1]}, model_cls).bad_words == words[:-1]


def test_an_unhandled_exception_answers_500_with_an_openai_error_body() -> None:
    """A bug in a route (an exception that is not an `APIError`) gets a 500 in OpenAI's shape, naming the exception
    type only (no message or traceback, which the server logs), not Starlette's plain-text 500."""
    from fastapi import FastAPI
    from pagedserve.serve_app import ingress as ingress_module

    handler = ingress_module._internal_error_handler
    assert fastapi_app.exception_handlers[Exception] is handler
    app = FastAPI()  # the same handler on an app with a failing route (the product's routes do not fail on cue)
    app.add_exception_handler(Exception, handler)

    @app.post("/v1/chat/completions")
    async def failing() -> None:
        raise KeyError("secret internals")

    response = TestClient(app, raise_server_exceptions=False).post("/v1/chat/completions", json={})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_server_error" and error["code"] == 500
    assert "KeyError" in error["message"] and "secret" not in error["message"]


def test_model_info_answers_503_in_bounded_time_while_no_engine_replica_answers() -> None:
    """While no engine replica runs (starting, or its model failed to load) Serve holds a call to it without an
    answer: /v1/models and every request that needs the model's facts hung until the HTTP timeout (found by
    starting the service with a model path that does not exist). Each caller now waits at most the router's
    queue_timeout_s for the one shared call, then gets a 503; the call goes on, and answers the next caller."""
    from types import SimpleNamespace

    from pagedserve.config.serve import RouterSettings

    async def scenario() -> None:
        answer = asyncio.get_running_loop().create_future()
        calls = []

        def remote():
            calls.append(1)
            return answer

        edge = OpenAIIngress.__new__(OpenAIIngress)
        edge.args = ServeArgs(router=RouterSettings(queue_timeout_s=0.2))
        edge._info, edge._info_task, edge.lora_registry, edge._loras = None, None, None, {}
        edge.replica = SimpleNamespace(model_info=SimpleNamespace(remote=remote))
        edge.metrics = SimpleNamespace(set_model_name=lambda name: None)
        for _ in range(2):
            with pytest.raises(APIError) as error:
                await asyncio.wait_for(edge.model_info(), 2.0)
            assert error.value.status_code == 503 and "no engine replica answered within 0.2 s" in error.value.message
        assert len(calls) == 1  # one call, shared, still waiting
        answer.set_result(SimpleNamespace(model_name="m", lora_names=[]))
        assert (await edge.model_info()).model_name == "m"

    asyncio.run(scenario())


def test_a_client_that_leaves_a_full_response_logs_one_line_and_no_asyncio_error() -> None:
    """A client that goes away before its (non-streamed) response is a normal event: one line and a count. The
    gather of the prompts' calls, cancelled inside wait_for, ended with a CancelledError nobody read, which asyncio
    logged as "_GatheringFuture exception was never retrieved" with a traceback (3 of 4 such disconnects in a load
    of 64 requests with random cancels on the demo model)."""
    import gc
    from types import SimpleNamespace

    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        left: list[str] = []

        async def collect(_request):
            await asyncio.sleep(60)

        edge = OpenAIIngress.__new__(OpenAIIngress)
        edge.args = ServeArgs()
        edge.calls = SimpleNamespace(collect=collect)
        edge.metrics = SimpleNamespace(client_left=lambda: left.append("left"))
        handler = asyncio.ensure_future(edge.full_response(None, "m", "cmpl-1", [object(), object()], None, chat=False))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert left == ["left"]
        return errors

    errors = asyncio.run(scenario())
    assert not errors, [e.get("message") for e in errors]


def test_null_for_a_field_with_a_default_means_the_default() -> None:
    """OpenAI's parameters are nullable: clients that serialize unset options send `null`, which was a 400
    ("expected an integer, but got null") for every field without None among its values. A required field stays
    required."""
    chat = parse({"messages": MESSAGES, "n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None,
                  "logprobs": None, "parallel_tool_calls": None, "temperature": None, "max_tokens": None})
    assert (chat.n, chat.stream, chat.presence_penalty, chat.logprobs, chat.parallel_tool_calls) == (1, False, 0.0,
                                                                                                    False, True)
    assert chat.temperature is None and chat.max_tokens is None
    completion = parse({"prompt": "Hi", "n": None, "echo": None, "max_tokens": None, "min_tokens": None},
                       oai.CompletionRequest)
    assert (completion.n, completion.echo, completion.max_tokens, completion.min_tokens) == (1, False, 16, 0)
    assert refusal({"prompt": None}, oai.CompletionRequest).param == "prompt"
    assert refusal({"messages": None}).param == "messages"
    # Refused for another field, the error names that one, not the null.
    error = refusal({"messages": MESSAGES, "n": None, "temperature": 5})
    assert error.param == "temperature" and "null" not in error.message
