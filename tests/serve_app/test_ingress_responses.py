"""The ingress's two answers to one request without a cluster: `OpenAIIngress.stream_response` and
`full_response` over the same scripted engine deltas. The streamed events, joined, must say what the one
response says (text, tool calls, finish reasons, logprobs, usage). Found by a randomized differential test
of the service on a tiny model (stream vs one response, HTTP vs the offline engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*was never awaited:RuntimeWarning")
from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.engine.core.request import (  # noqa: E402
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
    merge_delta,
)
from pagedserve.serve_app import openai_protocol as oai  # noqa: E402
from pagedserve.serve_app.ingress import OpenAIIngress  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}]


class ScriptedCalls:
    """`ReplicaCalls` as the response methods use it, answering each prompt with a fixed list of deltas."""

    def __init__(self, deltas_by_prompt: list[list[RequestOutput]]) -> None:
        self.deltas_by_prompt = deltas_by_prompt

    async def open_streams(self, requests: list[Any]) -> list[int]:
        return list(range(len(requests)))

    async def merged(self, streams: list[int]) -> AsyncIterator[tuple[int, RequestOutput]]:
        for prompt_index in streams:
            for delta in self.deltas_by_prompt[prompt_index]:
                yield prompt_index, delta

    async def collect(self, request: Any) -> RequestOutput:
        output = None
        for delta in self.deltas_by_prompt[int(request.request_id.rsplit("-", 1)[1])]:
            output = merge_delta(output, delta)
        return output

    @staticmethod
    def cancel(streams: list[Any]) -> None:
        pass


def delta(text: str, tokens: list[tuple[int, str]], finish_reason: str | None = None,
          prompt_token_ids: list[int] | None = None) -> RequestOutput:
    """One delta of completion 0: its text, and its (token id, decoded text) tokens, each with a logprob."""
    logprobs = [{token: Logprob(-0.5, rank=1, decoded_token=decoded)} for token, decoded in tokens]
    return RequestOutput("r", None, prompt_token_ids or [], [CompletionOutput(
        0, text, [token for token, _ in tokens], logprobs=logprobs, finish_reason=finish_reason)],
        finish_reason is not None)


def edge(deltas_by_prompt: list[list[RequestOutput]]) -> OpenAIIngress:
    ingress = OpenAIIngress.__new__(OpenAIIngress)
    ingress.args = ServeArgs()
    ingress.calls = ScriptedCalls(deltas_by_prompt)
    ingress._pacer = SimpleNamespace(book=lambda: 0.0)
    ingress.metrics = SimpleNamespace(client_left=lambda: None)
    return ingress


def both_answers(ingress: OpenAIIngress, body: Any, chat: bool, num_prompts: int = 1,
                 parser: str = "hermes") -> tuple[dict, list[dict]]:
    """(the one response's JSON, the stream's events before [DONE])."""
    plan = body.tool_plan(parser) if chat else None
    requests = [SimpleNamespace(request_id=f"req-{i}", sampling_params=SamplingParams(n=body.n))
                for i in range(num_prompts)]
    info = SimpleNamespace(tokenizer=None)

    async def run() -> tuple[bytes, bytes]:
        full = await ingress.full_response(info, "m", "req", requests, body, chat=chat, plan=plan)
        streamed = await ingress.stream_response(info, "m", "req", requests, body, chat=chat, plan=plan)
        return full.body, b"".join([piece async for piece in streamed.body_iterator])

    full, streamed = asyncio.run(run())
    events = [line[len("data: "):] for line in streamed.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return json.loads(full), [json.loads(event) for event in events[:-1]]


def test_a_tool_stream_sends_the_logprobs_of_the_text_it_held_back() -> None:
    """Under tool_choice required the stream holds the text back until the completion ends, then sends the calls
    whole: its logprobs held only the last delta's tokens (2 of 20 on the tiny model), the response's all."""
    body = oai.ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, "tool_choice": "required",
        "logprobs": True, "top_logprobs": 1, "stream": True})
    deltas = [delta('[{"name": ', [(1, '[{"name'), (2, '": ')]), delta('"get_weather", ', [(3, '"get_weather", ')]),
              delta('"parameters": {"city": "Oslo"}}]', [(4, '"parameters": '), (5, '{"city": "Oslo"}'), (6, "}]")],
                    "stop", prompt_token_ids=[9, 9])]
    full, events = both_answers(edge([deltas]), body, chat=True)
    streamed = [token for event in events for choice in event["choices"]
                for token in (choice.get("logprobs") or {}).get("content") or []]
    assert full["choices"][0]["finish_reason"] == "tool_calls"
    assert len(full["choices"][0]["logprobs"]["content"]) == 6
    assert streamed == full["choices"][0]["logprobs"]["content"]


def test_streamed_text_offsets_follow_the_tokens_as_the_response_does() -> None:
    """A completion's text_offset counts the characters of the tokens before it. The stream began each delta at
    the length of the text sent so far instead: a delta whose bytes do not finish a character has no text yet
    (its token reads "\ufffd"), so the stream's offsets differed from the response's, and with them how the
    deltas happened to be cut (they fold while a client reads slowly)."""
    body = oai.CompletionRequest.model_validate({"prompt": "x", "logprobs": 0, "max_tokens": 4})
    deltas = [delta("a", [(1, "a")]), delta("", [(2, "\ufffd")]), delta("\u00e9", [(3, "\ufffd")]),
              delta("bc", [(4, "bc")], "length", prompt_token_ids=[9])]
    full, events = both_answers(edge([deltas]), body, chat=False)
    want = full["choices"][0]["logprobs"]
    assert want["text_offset"] == [0, 1, 2, 3]
    streamed = [choice["logprobs"] for event in events for choice in event["choices"]]
    assert [offset for logprobs in streamed for offset in logprobs["text_offset"]] == want["text_offset"]
    assert [token for logprobs in streamed for token in logprobs["tokens"]] == want["tokens"]


@pytest.mark.parametrize("parser, text", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    ("mistral", 'Checking.  [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
])
def test_an_auto_tool_call_after_some_content_streams_as_a_tool_call(parser: str, text: str) -> None:
    """Under tool_choice auto a model may write a few words before its call. The one response read the call; the
    stream sent everything as content once the text did not start like a call, and ended with finish_reason
    stop. Now the stream sends the words, holds the text from the call's marker on, and ends with the call."""
    body = oai.ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, "tool_choice": "auto", "stream": True})
    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
    deltas = [delta(piece, [(i, piece)], "stop" if i == len(pieces) - 1 else None, prompt_token_ids=[9])
              for i, piece in enumerate(pieces)]
    ingress = edge([deltas])
    ingress.args = ServeArgs(tool_call_parser=parser)
    full, events = both_answers(ingress, body, chat=True, parser=parser)
    message = full["choices"][0]["message"]
    assert full["choices"][0]["finish_reason"] == "tool_calls" and message["tool_calls"]
    choices = [choice for event in events for choice in event["choices"]]
    content = "".join(choice["delta"].get("content") or "" for choice in choices)
    calls = [(call["function"]["name"], call["function"]["arguments"])
             for choice in choices for call in choice["delta"].get("tool_calls") or []]
    assert content == message["content"]
    assert calls == [(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]]
    assert [choice["finish_reason"] for choice in choices if choice.get("finish_reason")] == ["tool_calls"]


class FakeEngineReplicas:
    """Starts engine requests (as `ChannelHub.start` does) on one in-process `FakeAsyncEngine`; the first
    request's replica is lost (ActorDiedError) after `lost_after` of its deltas."""

    def __init__(self, engine: Any, lost_after: int | None) -> None:
        self.engine = engine
        self.lost_after = lost_after
        self.calls: list[Any] = []

    def start(self, request: Any) -> Any:
        from ray.exceptions import ActorDiedError

        lost_after = self.lost_after if not self.calls else None
        self.calls.append(request)

        async def items() -> AsyncIterator[RequestOutput]:
            prompt = request.prompt if request.prompt_token_ids is None else request.prompt_token_ids
            num_sent = 0
            async for output in self.engine.generate(prompt, request.sampling_params, request.request_id,
                                                     continuation=request.continuation):
                if num_sent == lost_after:
                    raise ActorDiedError()
                yield output
                num_sent += 1

        return _Call(items())


class _Call:
    """A replica call as `ReplicaCalls` uses it: an async iterator with `cancel()`."""

    def __init__(self, items: AsyncIterator[RequestOutput]) -> None:
        self.items = items

    def __aiter__(self) -> "_Call":
        return self

    async def __anext__(self) -> RequestOutput:
        return await self.items.__anext__()

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("n", [1, 2])
def test_usage_of_a_continued_request_counts_the_prompt_once(tiny_model_path: str, monkeypatch, n: int) -> None:
    """A request whose replica is lost mid-generation goes on elsewhere from the tokens received, sent as its
    prompt plus those tokens: its usage must still count the original prompt as prompt_tokens and every token
    generated once as completion_tokens, as for a request that never moved, streamed (include_usage) or not."""
    from fake_engine import FakeAsyncEngine
    from pagedserve.config.engine import EngineConfig
    from pagedserve.serve_app import replica_calls
    from pagedserve.serve_app.messages import GenerateRequest

    monkeypatch.setattr(replica_calls, "RETRY_BACKOFF_S", 0.0)
    engine = FakeAsyncEngine(EngineConfig(model=tiny_model_path, max_model_len=256, block_size=16, num_blocks=64))
    prompt_ids = engine.tokenizer.encode("FAST tell me about paged caches")
    max_tokens = 6

    def answers(lost_after: int | None, stream: bool) -> tuple[list[str], dict, int]:
        ingress = edge([])
        replicas = FakeEngineReplicas(engine, lost_after)
        ingress.calls = replica_calls.ReplicaCalls(replicas)
        body = oai.CompletionRequest.model_validate({
            "prompt": prompt_ids, "max_tokens": max_tokens, "n": n, "seed": 3, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})})
        params = SamplingParams(n=n, max_tokens=max_tokens, seed=3)
        requests = [GenerateRequest("req-0", prompt_ids, params, num_prompt_tokens=len(prompt_ids),
                                    max_new_tokens=n * max_tokens, stream=stream, prompt_token_ids=prompt_ids)]
        info = SimpleNamespace(tokenizer=engine.tokenizer)

        async def run() -> bytes:
            if not stream:
                return (await ingress.full_response(info, "m", "req", requests, body, chat=False)).body
            response = await ingress.stream_response(info, "m", "req", requests, body, chat=False)
            return b"".join([piece async for piece in response.body_iterator])

        raw = asyncio.run(run())
        num_continued = sum(call.continuation is not None for call in replicas.calls)
        if not stream:
            full = json.loads(raw)
            return [choice["text"] for choice in full["choices"]], full["usage"], num_continued
        events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]" and not any('"error"' in event for event in events), events
        chunks = [json.loads(event) for event in events[:-1]]
        texts = [""] * n
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
        return texts, chunks[-1]["usage"], num_continued

    want_texts, want_usage, _ = answers(None, stream=False)
    assert want_usage == {"prompt_tokens": len(prompt_ids), "completion_tokens": n * max_tokens,
                          "total_tokens": len(prompt_ids) + n * max_tokens}
    for stream in (False, True):
        # Non-streamed, the replica sends its first delta alone (the ingress waits for it): lost after it.
        texts, usage, num_continued = answers(1 if not stream else 2, stream)
        assert num_continued == n  # each completion went on elsewhere from the tokens it had
        assert (texts, usage) == (want_texts, want_usage)
