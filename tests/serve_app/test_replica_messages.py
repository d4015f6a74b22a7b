"""How a replica sends a request's tokens, on the replica object itself (no Ray cluster).

With `FakeAsyncEngine` every token arrives as its own delta, so the counts are exact: a non-streaming
request crosses to the ingress as two items (the first delta, then the rest merged). No token is lost or
reordered. How the items travel (the stream channel) is tests/serve_app/test_stream_channel.py's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.engine.core.request import SamplingParams  # noqa: E402
from pagedserve.serve_app.messages import GenerateRequest  # noqa: E402
from pagedserve.serve_app.replica import EngineReplica  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]
MAX_TOKENS = 12


def _request(request_id: str, stream: bool) -> GenerateRequest:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return GenerateRequest(request_id, PROMPT, params, len(PROMPT), max_new_tokens=MAX_TOKENS, stream=stream)


@pytest.fixture
def make_replica(tiny_model_path, monkeypatch):
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # outside a deployment
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # fake_engine

    def make(**args) -> EngineReplica:
        return EngineReplica(ServeArgs.from_args({"model": tiny_model_path, "engine_class": "fake_engine:FakeAsyncEngine",
                                                  **args}))

    yield make
    sys.modules.pop("fake_engine", None)


def _collect(replica: EngineReplica, request: GenerateRequest) -> tuple[list, float]:
    async def run() -> list:
        return [output async for output in replica.generate(request)]

    started = time.perf_counter()
    messages = asyncio.run(run())
    return messages, time.perf_counter() - started


def _tokens(messages: list) -> list[int]:
    return sum((m.outputs[0].token_ids for m in messages), [])


def test_a_non_streaming_request_takes_two_messages(make_replica):
    replica = make_replica()
    streamed, _ = _collect(replica, _request("s", stream=True))
    full, _ = _collect(replica, _request("f", stream=False))
    assert len(streamed) == MAX_TOKENS
    assert len(full) == 2 and full[-1].finished and full[-1].outputs[0].finish_reason == "length"
    assert _tokens(full) == _tokens(streamed) and len(_tokens(full)) == MAX_TOKENS
