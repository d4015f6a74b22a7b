"""`ReplicaCalls` without a cluster: a fake deployment handle whose calls play scripted streams, so the
resend rules are checked exactly (what counts as a lost replica, when a request is sent again and when it is
continued from the tokens received, how often, and what each continuation asks of the engine)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from pagedserve.engine.core.request import CompletionOutput, RequestOutput, SamplingParams  # noqa: E402
from pagedserve.serve_app import replica_calls  # noqa: E402
from pagedserve.serve_app.api_errors import APIError  # noqa: E402
from pagedserve.serve_app.errors import ServiceOverloadedError  # noqa: E402
from pagedserve.serve_app.messages import GenerateRequest, ReplicaError  # noqa: E402
from pagedserve.serve_app.replica_calls import ReplicaCalls  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402

LOST = ActorDiedError()  # what a call into a replica whose process died raises
ENGINE_DEAD = ReplicaError(503, "service_unavailable", "engine is not running: core exited")


def delta(token: int, finished: bool = False, index: int = 0) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2], [CompletionOutput(index, f"t{token}", [token],
                                                              finish_reason="length" if finished else None)], finished)


def deltas(*completions: tuple[int, int, bool], finished: bool = False) -> RequestOutput:
    """One delta of several completions: (index, token, finished) each."""
    return RequestOutput("r", "p", [1, 2], [CompletionOutput(i, f"t{t}", [t], finish_reason="length" if done else None)
                                             for i, t, done in completions], finished)


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
    """Starts engine requests (as `ChannelHub.start` does), each answered by the next scripted stream."""

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.calls: list[GenerateRequest] = []
        self.streams: list[Stream] = []

    def start(self, request: GenerateRequest) -> Stream:
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


def stream_items(replica: ReplicaCalls, *requests: GenerateRequest) -> list[tuple[int, Any]]:
    async def run() -> list[tuple[int, Any]]:
        prompts = await replica.open_streams(list(requests))
        return [pair async for pair in replica.merged(prompts)]

    return asyncio.run(run())


def test_one_response_goes_on_elsewhere_when_its_replica_dies_mid_generation() -> None:
    handle = Handle([delta(5), LOST], [delta(6), delta(7, finished=True)])
    replica, resent = calls(handle)
    output = asyncio.run(replica.collect(request(stream=False)))
    assert output.outputs[0].token_ids == [5, 6, 7] and output.finished
    continued = handle.calls[1]
    assert continued.request_id == "req-resume1-0"  # the router's bookkeeping keys
    assert continued.continuation.output_token_ids == (5,) and continued.sampling_params.n == 1
    # Routed for what is left: the tokens produced count as prompt, the rest of max_tokens as new tokens.
    assert (continued.num_prompt_tokens, continued.max_new_tokens, continued.stream) == (3, 2, False)
    assert len(resent) == 1
    # The lost call is cancelled; the one that delivered the last delta ends by itself (not CANCELLED in Serve).
    assert [s.cancelled for s in handle.streams] == [True, False]


class Slow(Stream):
    """A call whose items take a while (a replica generating): the consumer can leave in between."""

    async def __anext__(self) -> Any:
        await asyncio.sleep(0.01)
        return await super().__anext__()


def playing(handle: Handle, stream_cls: type[Stream]) -> Handle:
    handle.start = lambda request: handle.streams.append(stream_cls(handle.scripts.pop(0))) or handle.streams[-1]
    return handle


def test_a_complete_prompt_lets_its_call_end_and_an_abandoned_one_cancels_it() -> None:
    handle = playing(Handle([delta(5), delta(6, finished=True)], [delta(7), delta(8), delta(9, finished=True)]), Slow)
    replica, _ = calls(handle)

    async def run() -> None:
        (complete,) = await replica.open_streams([request(stream=True)])
        assert [item.outputs[0].token_ids async for item in complete.items()] == [[5], [6]]
        (abandoned,) = await replica.open_streams([request(stream=True)])
        items = abandoned.items()
        await items.__anext__()
        await items.aclose()  # the client went away after its first token
        await asyncio.sleep(0)

    asyncio.run(run())
    assert [(s.cancelled, s.items) for s in handle.streams] == [(False, []), (True, [delta(8), delta(9, finished=True)])]


def test_a_complete_prompts_call_still_open_after_the_grace_period_is_cancelled(monkeypatch) -> None:
    monkeypatch.setattr(replica_calls, "END_GRACE_S", 0.05)

    class Lingering(Stream):
        async def __anext__(self) -> Any:
            if not self.items:
                await asyncio.sleep(10)  # a call that does not return after its last delta
            return await super().__anext__()

    handle = playing(Handle([delta(5, finished=True)]), Lingering)
    replica, _ = calls(handle)

    async def run() -> None:
        (prompt,) = await replica.open_streams([request(stream=True)])
        assert [item.finished async for item in prompt.items()] == [True]
        assert not handle.streams[0].cancelled
        for _ in range(200):  # END_GRACE_S later, the call is cancelled
            if handle.streams[0].cancelled:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert handle.streams[0].cancelled


def test_a_stream_goes_on_from_the_tokens_received_at_most_twice() -> None:
    handle = Handle([delta(5), LOST], [delta(6), LOST], [delta(7), LOST], [delta(8, finished=True)])
    replica, resent = calls(handle)
    items = [item for _, item in stream_items(replica, request(stream=True))]
    assert [i.outputs[0].token_ids for i in items[:3]] == [[5], [6], [7]] and not any(i.finished for i in items[:3])
    assert isinstance(items[3], ActorDiedError) and len(items) == 4  # the third loss reaches the client
    assert [c.continuation.output_token_ids for c in handle.calls[1:]] == [(5,), (5, 6)]
    assert len(handle.calls) == 3 and len(resent) == 2


def test_only_the_unfinished_completions_go_on_each_with_its_own_seed_and_index() -> None:
    seeded = GenerateRequest("req", [1, 2], SamplingParams(n=3, max_tokens=3, seed=40, logprobs=0),
                             num_prompt_tokens=2, max_new_tokens=9)
    first = deltas((0, 5, False), (1, 6, True), (2, 7, False))
    first.outputs[2].cumulative_logprob = -1.5
    handle = Handle([first, LOST], [delta(8), delta(9, finished=True)], [delta(10), delta(11, finished=True)])
    replica, resent = calls(handle)
    items = [item for _, item in stream_items(replica, seeded)]
    by_index: dict[int, list[int]] = {}
    for item in items:
        for completion in item.outputs:
            by_index.setdefault(completion.index, []).extend(completion.token_ids)
    assert sorted(by_index.values()) == sorted([[5, 8, 9], [6], [7, 10, 11]]) and by_index[1] == [6]
    assert [item.finished for item in items].count(True) == 1 and items[-1].finished  # once, at the very end
    continued = {c.request_id: c for c in handle.calls[1:]}
    assert set(continued) == {"req-resume1-0", "req-resume1-2"}
    zero, two = continued["req-resume1-0"], continued["req-resume1-2"]
    assert (zero.sampling_params.seed, two.sampling_params.seed) == (40, 42)  # seed + completion index
    assert two.continuation.output_token_ids == (7,) and two.continuation.cumulative_logprob == -1.5
    assert (two.num_prompt_tokens, two.max_new_tokens) == (3, 2)
    assert len(resent) == 1


def test_an_engine_error_after_a_continuation_ends_the_prompt() -> None:
    failed = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "", [], finish_reason="error")], True,
                           error="boom")
    handle = Handle([delta(5), LOST], [delta(6), failed])
    replica, _ = calls(handle)
    items = [item for _, item in stream_items(replica, request(stream=True))]
    assert items[-1].finished and items[-1].error == "boom"
    assert [t for item in items for t in item.outputs[0].token_ids] == [5, 6]


def test_a_continuation_that_is_refused_ends_the_stream_with_that_error() -> None:
    handle = Handle([delta(5), LOST], [ServiceOverloadedError("all replicas are full", retry_after_s=2)])
    replica, _ = calls(handle)
    items = [item for _, item in stream_items(replica, request(stream=True))]
    assert len(items) == 2 and isinstance(items[1], APIError) and items[1].status_code == 429


def test_a_prompt_cancelled_while_its_continuation_waits_starts_nothing(monkeypatch) -> None:
    monkeypatch.setattr(replica_calls, "RETRY_BACKOFF_S", 0.2)
    handle = Handle([delta(5), LOST], [delta(6, finished=True)])
    replica, _ = calls(handle)

    async def run() -> list[Any]:
        (prompt,) = await replica.open_streams([request(stream=True)])
        seen: list[Any] = []

        async def consume() -> None:
            async for item in prompt.items():
                seen.append(item)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the loss is seen; the continuation waits out its backoff
        prompt.cancel()
        await asyncio.wait_for(task, 2.0)
        return seen

    seen = asyncio.run(run())
    assert seen[0].outputs[0].token_ids == [5] and len(handle.calls) == 1
    assert all(s.cancelled for s in handle.streams)


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


def test_a_stream_is_sent_again_from_the_start_when_lost_before_its_first_item() -> None:
    handle = Handle([LOST], [delta(5), delta(6, finished=True)])
    replica, resent = calls(handle)
    items = [item for _, item in stream_items(replica, request(stream=True))]
    assert [t for i in items for t in i.outputs[0].token_ids] == [5, 6] and items[-1].finished
    assert [c.request_id for c in handle.calls] == ["req", "req-retry1"] and handle.calls[1].continuation is None
    assert len(resent) == 1


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

    def stream() -> list[Any]:
        return [item for _, item in stream_items(replica, request(stream=True))]

    assert stream() == [failed]  # sent again after the dead engine; the request failed
    assert replica.last_output_s is None
    assert asyncio.run(replica.collect(request(stream=False))).finished
    after_collect = replica.last_output_s
    assert after_collect is not None
    assert [t for item in stream() for t in item.outputs[0].token_ids] == [7, 8]
    assert replica.last_output_s > after_collect


def test_a_replica_lost_after_the_last_delta_of_its_completion_costs_nothing() -> None:
    """n=2 split over two continuations; one's replica dies after that completion's last token: nothing is
    sent again for it, and the prompt ends when the other completion does."""
    two = GenerateRequest("req", [1, 2], SamplingParams(n=2, max_tokens=3), num_prompt_tokens=2, max_new_tokens=6)
    handle = Handle([deltas((0, 5, False), (1, 6, False)), LOST],
                    [delta(7), delta(8, finished=True), LOST], [delta(9), delta(10, finished=True)])
    replica, resent = calls(handle)
    items = [item for _, item in stream_items(replica, two)]
    assert items[-1].finished and sum(item.finished for item in items) == 1
    assert len(handle.calls) == 3 and len(resent) == 1


def test_a_reader_that_waits_gets_each_prompts_deltas_folded_into_one() -> None:
    handle = Handle([delta(5), delta(6), delta(7), delta(8, finished=True)],
                    [delta(1), ReplicaError(500, "internal_server_error", "request failed")])
    replica, _ = calls(handle)

    async def run() -> list[tuple[int, Any]]:
        prompts = await replica.open_streams([request(stream=True), dataclasses.replace(request(stream=True),
                                                                                       request_id="other")])
        items = []
        async for pair in replica.merged(prompts):
            items.append(pair)
            await asyncio.sleep(0.05)  # a paced stream: everything that arrives meanwhile comes as one
        return items

    items = asyncio.run(run())
    by_prompt: dict[int, list[Any]] = {0: [], 1: []}
    for index, item in items:
        by_prompt[index].append(item)
    tokens = [t for item in by_prompt[0] for t in item.outputs[0].token_ids]
    assert tokens == [5, 6, 7, 8] and by_prompt[0][-1].finished
    assert len(by_prompt[0]) < 4  # folded: fewer items than deltas
    assert "".join(item.outputs[0].text for item in by_prompt[0]) == "t5t6t7t8"
    assert [t for item in by_prompt[1][:-1] for t in item.outputs[0].token_ids] == [1]
    assert isinstance(by_prompt[1][-1], ReplicaError)  # an error is never folded away
    assert len(items) == len(by_prompt[0]) + len(by_prompt[1])


def test_folding_leaves_the_deltas_it_folds_as_they_came() -> None:
    first, second = delta(5), delta(6, finished=True)
    ((index, folded),) = replica_calls._coalesced([(0, first), (0, second)])
    assert folded.outputs[0].token_ids == [5, 6] and folded.finished and folded.outputs[0].finish_reason == "length"
    assert first.outputs[0].token_ids == [5] and not first.finished
    after_error = replica_calls._coalesced([(0, delta(1)), (0, LOST), (0, delta(2))])
    assert [item if not isinstance(item, RequestOutput) else item.outputs[0].token_ids for _, item in after_error] \
        == [[1], LOST, [2]]
