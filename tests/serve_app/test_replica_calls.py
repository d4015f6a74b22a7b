"""`ReplicaCalls` without a cluster: a fake deployment handle whose calls play scripted streams, so the
resend rules are checked exactly (what counts as a lost replica, when a request may go again, how often)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from pagedserve.engine.request import CompletionOutput, RequestOutput, SamplingParams  # noqa: E402
from pagedserve.serve_app import replica_calls  # noqa: E402
from pagedserve.serve_app.api_errors import APIError  # noqa: E402
from pagedserve.serve_app.errors import ServiceOverloadedError  # noqa: E402
from pagedserve.serve_app.replica import GenerateRequest, ReplicaError  # noqa: E402
from pagedserve.serve_app.replica_calls import ReplicaCalls  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402

LOST = ActorDiedError()  # what a call into a replica whose process died raises
ENGINE_DEAD = ReplicaError(503, "service_unavailable", "engine is not running: core exited")


def delta(token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2], [CompletionOutput(0, f"t{token}", [token],
                                                              finish_reason="length" if finished else None)], finished)


class Stream:
    """One replica call: yields its items; an exception among them is raised there."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """`handle.options(stream=True).generate.remote(request)`, answered by the next scripted stream."""

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.calls: list[GenerateRequest] = []
        self.streams: list[Stream] = []
        self.generate = self

    def options(self, **_: Any) -> "Handle":
        return self

    def remote(self, request: GenerateRequest) -> Stream:
        self.calls.append(request)
        self.streams.append(Stream(self.scripts.pop(0)))
        return self.streams[-1]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_calls, "RETRY_BACKOFF_S", 0.0)


def request(stream: bool) -> GenerateRequest:
    return GenerateRequest("req", [1, 2], SamplingParams(max_tokens=3), num_prompt_tokens=2, stream=stream)


def calls(handle: Handle) -> tuple[ReplicaCalls, list[int]]:
    resent: list[int] = []
    return ReplicaCalls(handle, on_resend=lambda: resent.append(1)), resent


def test_one_response_is_sent_again_when_its_replica_dies_mid_generation() -> None:
    handle = Handle([delta(5), LOST], [delta(5), delta(6), delta(7, finished=True)])
    replica, resent = calls(handle)
    output = asyncio.run(replica.collect(request(stream=False)))
    assert output.outputs[0].token_ids == [5, 6, 7] and output.finished  # nothing of attempt 1 kept
    assert [r.request_id for r in handle.calls] == ["req", "req-retry1"]  # the router's bookkeeping keys
    assert len(resent) == 1 and all(s.cancelled for s in handle.streams)


def test_a_dead_engine_counts_as_a_lost_replica_too() -> None:
    handle = Handle([ENGINE_DEAD], [delta(5, finished=True)])
    replica, resent = calls(handle)
    assert asyncio.run(replica.collect(request(stream=False))).outputs[0].token_ids == [5]
    assert len(resent) == 1


def test_three_attempts_at_most_then_a_503() -> None:
    handle = Handle([LOST], [LOST], [LOST], [delta(5, finished=True)])
    replica, resent = calls(handle)
    with pytest.raises(APIError) as error:
        asyncio.run(replica.collect(request(stream=False)))
    assert error.value.status_code == 503 and len(handle.calls) == 3 and len(resent) == 2


@pytest.mark.parametrize(("failure", "status"), [
    (ServiceOverloadedError("all replicas are full", retry_after_s=2), 429),  # a refusal: the client retries
    (ReplicaError(400, "invalid_request_error", "prompt too long", "prompt"), 400),  # the request's own fault
    (ReplicaError(500, "internal_server_error", "request failed: boom"), 500),
])
def test_refusals_and_the_requests_own_errors_are_not_sent_again(failure, status: int) -> None:
    handle = Handle([failure], [delta(5, finished=True)])
    replica, resent = calls(handle)
    with pytest.raises(APIError) as error:
        asyncio.run(replica.collect(request(stream=False)))
    assert error.value.status_code == status and len(handle.calls) == 1 and not resent


def test_a_stream_is_sent_again_only_before_its_first_item() -> None:
    handle = Handle([LOST], [delta(5), LOST])
    replica, resent = calls(handle)

    async def run() -> list[Any]:
        (stream,), (first,) = await replica.open_streams([request(stream=True)])
        return [item async for _, item in replica.merged([stream], [first])]

    items = asyncio.run(run())
    # Attempt 2 gave its first token: from then on a loss reaches the client (as an error item), once.
    assert items[0].outputs[0].token_ids == [5] and isinstance(items[1], ActorDiedError)
    assert len(handle.calls) == 2 and len(resent) == 1


def test_when_one_prompt_is_refused_the_others_streams_are_cancelled() -> None:
    handle = Handle([delta(5)], [ReplicaError(400, "invalid_request_error", "bad", "prompt")])
    replica, _ = calls(handle)
    with pytest.raises(APIError):
        asyncio.run(replica.open_streams([request(stream=True), request(stream=True)]))
    assert all(s.cancelled for s in handle.streams)


def test_last_output_time_moves_with_outputs_only() -> None:
    """`last_output_s` (the ingress's /health evidence) moves on the outputs of every path, and not on a
    lost replica or an output of a failed request."""
    failed = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "", [], finish_reason="error")], True,
                           error="boom")
    handle = Handle([ENGINE_DEAD], [failed], [delta(5), delta(6, finished=True)], [delta(7), delta(8)])
    replica, _ = calls(handle)

    async def stream() -> list[Any]:
        (s,), (first,) = await replica.open_streams([request(stream=True)])
        return [item async for _, item in replica.merged([s], [first])]

    assert asyncio.run(stream()) == [failed]  # sent again after the dead engine; the request failed
    assert replica.last_output_s is None
    assert asyncio.run(replica.collect(request(stream=False))).finished
    after_collect = replica.last_output_s
    assert after_collect is not None
    assert len(asyncio.run(stream())) == 2
    assert replica.last_output_s > after_collect
