"""The stream channel (serve_app/stream_channel.py) between real `EngineReplica` objects and the ingress's
`ChannelHub` + `ReplicaCalls`, in one event loop and without a Ray cluster: `LocalHandle` plays Serve's
handle (each call's generator runs in a task of its own, as on a replica, and `cancel()` cancels it).

The engine is `FakeAsyncEngine`, whose requests advance together on a step clock: the counts are exact.
tests/serve_app/test_http_fake_engine.py checks the same through Ray and HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import logging
import itertools
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.engine.core.request import RequestOutput, SamplingParams  # noqa: E402
from pagedserve.serve_app.api_errors import APIError, replica_lost  # noqa: E402
from pagedserve.serve_app.errors import ChannelLostError  # noqa: E402
from pagedserve.serve_app.messages import GenerateRequest, ReplicaError  # noqa: E402
from pagedserve.serve_app.replica import EngineReplica  # noqa: E402
from pagedserve.serve_app.replica_calls import ReplicaCalls  # noqa: E402
from pagedserve.serve_app import stream_channel  # noqa: E402
from pagedserve.serve_app.stream_channel import ChannelHub, Inbox, Outboxes, is_last  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]
MAX_TOKENS = 12


class LocalCall:
    """A streaming call answered by an async generator running in its own task; items queue for the reader."""

    def __init__(self, items: Any) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(items))

    async def _run(self, items: Any) -> None:
        try:
            async for item in items:
                self._queue.put_nowait(("item", item))
            self._queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            self._queue.put_nowait(("error", RuntimeError("cancelled")))
            raise
        except Exception as exc:  # noqa: BLE001 - the caller's to see
            self._queue.put_nowait(("error", exc))

    def __aiter__(self) -> "LocalCall":
        return self

    async def __anext__(self) -> Any:
        kind, value = await self._queue.get()
        if kind == "end":
            self._queue.put_nowait((kind, value))
            raise StopAsyncIteration
        if kind == "error":
            self._queue.put_nowait((kind, value))
            raise value
        return value

    def cancel(self) -> None:
        self._task.cancel()


class LocalHandle:
    """`handle.options(stream=True).<method>.remote(message)` on replica objects: `submit` round-robin,
    `channel` to the replica its `ChannelOpen` names (a missing one fails the call, as the router does)."""

    def __init__(self, *replicas: EngineReplica) -> None:
        self.replicas = {replica.replica_id: replica for replica in replicas}
        self._next = itertools.cycle(replicas)
        self.calls: list[LocalCall] = []
        self.address_calls: list[Any] = []  # `channel_address` calls: the channels opened over sockets

    def options(self, **_: Any) -> "LocalHandle":
        return self

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            def remote(message: Any) -> Any:
                if method == "channel_address":  # a unary call to the replica its `ChannelOpen` names
                    handle.address_calls.append(message)
                    replica = handle.replicas.get(message.replica_id)
                    if replica is None:
                        async def lost():
                            raise ChannelLostError(f"replica {message.replica_id} is no longer serving")
                        return lost()
                    return replica.channel_address(message)
                if method == "channel":
                    replica = handle.replicas.get(message.replica_id)
                    if replica is None:
                        async def gone():
                            raise ChannelLostError(f"replica {message.replica_id} is no longer serving")
                            yield  # pragma: no cover
                        call = LocalCall(gone())
                    else:
                        call = LocalCall(replica.channel(message))
                else:
                    call = LocalCall(getattr(next(handle._next), method)(message))
                handle.calls.append(call)
                return call

        return Method


@pytest.fixture
def make_replica(tiny_model_path, monkeypatch):
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # outside a deployment
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # fake_engine

    def make(replica_id: str = "r0", **args: Any) -> EngineReplica:
        replica = EngineReplica(ServeArgs.from_args({
            "model": tiny_model_path, "engine_class": "fake_engine:FakeAsyncEngine", "num_blocks": 4096, **args}))
        replica.replica_id = replica_id
        return replica

    yield make
    sys.modules.pop("fake_engine", None)


def _request(request_id: str, stream: bool = True, max_tokens: int = MAX_TOKENS, prompt: Any = None) -> GenerateRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = PROMPT if prompt is None else prompt
    return GenerateRequest(request_id, prompt, params, len(prompt), max_new_tokens=max_tokens, stream=stream)


async def _expected_tokens(replica: EngineReplica, max_tokens: int = MAX_TOKENS) -> list[int]:
    tokens: list[int] = []
    async for output in replica.generate(_request("expected", max_tokens=max_tokens)):
        tokens += output.outputs[0].token_ids
    return tokens


async def _tokens(calls: ReplicaCalls, request: GenerateRequest) -> tuple[list[int], int]:
    """(tokens, number of items) of one prompt's stream."""
    (prompt,) = await calls.open_streams([request])
    tokens: list[int] = []
    count = 0
    async for item in prompt.items():
        assert isinstance(item, RequestOutput), item
        tokens += item.outputs[0].token_ids
        count += 1
    return tokens, count


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_200_streams_take_one_message_per_step_per_ingress(make_replica, transport):
    replica = make_replica()

    async def run() -> tuple[list, list[int], list[int], int]:
        expected = await _expected_tokens(replica)
        steps_before = replica.engine.get_stats().num_steps_total
        handle = LocalHandle(replica)
        hubs = [ChannelHub(handle, ingress_id=f"ingress{i}", transport=transport) for i in range(2)]
        ingresses = [ReplicaCalls(hub) for hub in hubs]
        results = await asyncio.gather(*(_tokens(ingresses[i % 2], _request(f"req{i}")) for i in range(200)))
        num_steps = replica.engine.get_stats().num_steps_total - steps_before
        return results, expected, [hub.num_messages for hub in hubs], num_steps

    results, expected, messages, num_steps = asyncio.run(run())
    assert all(tokens == expected for tokens, _ in results)
    assert len(expected) == MAX_TOKENS
    num_items = sum(count for _, count in results)
    # Every token reached its stream (above); a reader that fell behind (a loaded machine) got some deltas merged.
    assert 0 < num_items <= 200 * MAX_TOKENS
    # One message per engine step and ingress, whatever the number of streams (not one per delta).
    assert all(1 <= count <= num_steps + 1 for count in messages), (messages, num_steps)
    assert num_steps <= MAX_TOKENS + 2
    assert replica.serving_stats()["num_messages"] == sum(messages)


def test_each_message_reports_its_items_and_its_transit_by_the_two_wall_clocks(make_replica):
    replica = make_replica()
    replica.outboxes._wall_clock = lambda: 1000.0  # the replica stamps each message when it sends it
    seen: list[tuple[int, float]] = []

    async def run() -> list[int]:
        hub = ChannelHub(LocalHandle(replica), on_message=lambda items, delay_s: seen.append((items, delay_s)),
                         wall_clock=lambda: 1000.25)
        tokens, _ = await _tokens(ReplicaCalls(hub), _request("timed"))
        # A receiving clock behind the sender's (another node's) gives no negative transit.
        hub._wall_clock = lambda: 999.0
        await _tokens(ReplicaCalls(hub), _request("behind"))
        return tokens

    assert len(asyncio.run(run())) == MAX_TOKENS
    assert seen and sum(items for items, _ in seen) == 2 * MAX_TOKENS
    delays = {delay_s for _, delay_s in seen}
    assert delays == {0.25, 0.0}, delays


def test_a_replica_the_ingress_cannot_connect_to_sends_through_ray_instead(make_replica, caplog):
    import socket

    from pagedserve.serve_app.channel_socket import ChannelAddress

    replica = make_replica()
    with socket.socket() as probe:  # a port nobody listens on (as one a NetworkPolicy blocks)
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def unreachable(channel):
        return ChannelAddress("127.0.0.1", closed_port, b"\0" * 16)

    listening = replica.channel_address
    replica.channel_address = unreachable
    replica.outboxes.channel_idle_s = 0.05
    now = [0.0]

    async def run() -> tuple[list[int], list[int], int, list[int], list[int]]:
        expected = await _expected_tokens(replica)
        handle = LocalHandle(replica)
        hub = ChannelHub(handle)
        hub._clock = lambda: now[0]
        calls = ReplicaCalls(hub)
        tokens, _ = await _tokens(calls, _request("through-ray"))
        num_ray_channels = len(handle.calls) - 1  # the request's own call, then channels
        # The replica can be reached again (the failure was brief): within SOCKET_RETRY_S its channels still go
        # through Ray; past it the ingress tries the socket again, and stays there.
        replica.channel_address = listening
        await asyncio.sleep(0.2)  # the Ray channel ends idle
        await _tokens(calls, _request("still-ray"))
        sockets_before_retry = len([m for m in handle.address_calls])
        now[0] += stream_channel.SOCKET_RETRY_S + 1
        await asyncio.sleep(0.2)
        again, _ = await _tokens(calls, _request("through-the-socket"))
        return tokens, expected, num_ray_channels, again, [sockets_before_retry, len(handle.address_calls)]

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        tokens, expected, num_ray_channels, again, address_calls = asyncio.run(run())
    assert tokens == expected == again
    assert num_ray_channels >= 1
    assert "its messages come through Ray instead" in caplog.text
    assert address_calls[0] == 1  # within SOCKET_RETRY_S the second request's channel went through Ray
    assert address_calls[1] > address_calls[0]  # asked where to connect again after it


def test_a_replica_that_cannot_listen_on_its_node_address_sends_through_ray_instead(make_replica, caplog):
    # Ray's address for a node need not be one of its interfaces' (one given by hand, a NAT's): binding fails there.
    replica = make_replica()
    replica._channel_server.node_ip = "203.0.113.7"

    async def run() -> tuple[list[int], list[int]]:
        expected = await _expected_tokens(replica)
        hub = ChannelHub(LocalHandle(replica), node_ip="198.51.100.9")  # an ingress on another node
        tokens, _ = await _tokens(ReplicaCalls(hub), _request("through-ray"))
        return tokens, expected

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        tokens, expected = asyncio.run(run())
    assert tokens == expected
    assert "cannot listen on 203.0.113.7" in caplog.text and "its messages come through Ray instead" in caplog.text


def test_a_newer_channel_of_an_ingress_takes_the_items_an_older_one_still_waiting_would_have_taken():
    """The ingress opens a channel only once it is done with the previous one; where that one's end has not
    reached the replica (a Ray channel call failed at the ingress, its reader still waiting here), the older
    reader must leave every item to the newer one, whichever of the two wakes first."""
    async def run() -> tuple[list, list, int]:
        outboxes = Outboxes(channel_idle_s=5.0)
        with outboxes.request("ingress-a") as outbox:
            older = outboxes.channel("ingress-a")
            older_next = asyncio.ensure_future(older.__anext__())
            await asyncio.sleep(0.01)  # the older reader waits inside take()
            newer = outboxes.channel("ingress-a")
            newer_next = asyncio.ensure_future(newer.__anext__())
            await asyncio.sleep(0.01)
            for index in range(3):
                outbox.put("req", index)
            message = await asyncio.wait_for(newer_next, 2)
            with contextlib.suppress(StopAsyncIteration):
                await asyncio.wait_for(older_next, 2)  # it ended without a message
            await newer.aclose()
        return message.items, [older_next.exception() is not None], outbox.num_messages

    items, older_ended, num_messages = asyncio.run(run())
    assert items == [("req", 0), ("req", 1), ("req", 2)]
    assert older_ended == [True] and num_messages == 1


def test_a_requests_call_ends_once_its_last_item_is_on_its_way_not_when_it_is_queued(make_replica, monkeypatch):
    """Serve drains a replica by waiting for its calls, and a socket channel is none: a call that ended with its
    last item still queued would let Serve stop the replica with it. With nobody reading the channel the call waits
    (at most LAST_ITEM_SENT_TIMEOUT_S); with a reader it ends right after the reader took the last item."""
    import time

    from pagedserve.serve_app import replica as replica_module

    monkeypatch.setattr(replica_module, "LAST_ITEM_SENT_TIMEOUT_S", 0.3)
    replica = make_replica()
    async def call_duration_s(read: bool) -> tuple[float, list[str]]:
        ingress_id = f"ingress-{read}"  # an outbox of its own: the unread run leaves its items in its outbox
        request = dataclasses.replace(_request(f"drained-{read}", max_tokens=3), reply_to=ingress_id)
        events: list[str] = []
        reader = None
        if read:
            async def read_channel() -> None:
                async for message in replica.outboxes.channel(ingress_id):
                    if any(is_last(item) for _, item in message.items):
                        events.append("last item taken")

            reader = asyncio.ensure_future(read_channel())
        started = time.perf_counter()
        async for _ in replica.submit(request):
            pass
        events.append("call ended")
        duration_s = time.perf_counter() - started
        if reader is not None:
            reader.cancel()
        return duration_s, events

    unread_s, _ = asyncio.run(call_duration_s(read=False))
    read_s, events = asyncio.run(call_duration_s(read=True))
    assert unread_s >= 0.25
    assert read_s < 0.25 and events == ["last item taken", "call ended"], events


def test_a_non_streaming_request_still_takes_two_items(make_replica):
    replica = make_replica()

    async def run() -> list[Any]:
        (prompt,) = await ReplicaCalls(ChannelHub(LocalHandle(replica))).open_streams([_request("f", stream=False)])
        return [item async for item in prompt.items()]

    items = asyncio.run(run())
    assert len(items) == 2 and items[-1].finished
    assert len(items[0].outputs[0].token_ids) + len(items[1].outputs[0].token_ids) == MAX_TOKENS
    assert items[-1].prompt_token_ids == PROMPT  # the last delta carries the prompt (usage); the others do not


def test_a_cancelled_stream_frees_its_blocks_and_the_others_go_on(make_replica):
    replica = make_replica()

    async def run() -> tuple[list[int], int, dict]:
        expected = await _expected_tokens(replica, 40)
        calls = ReplicaCalls(ChannelHub(LocalHandle(replica)))
        leaver, stayer = await calls.open_streams([_request("leaver", max_tokens=40), _request("stayer", max_tokens=40)])
        async for _ in leaver.items():
            break  # the client went away after its first delta
        await asyncio.sleep(0.05)
        used_after_leave = dict(replica.engine._used)
        tokens = []
        async for item in stayer.items():
            tokens += item.outputs[0].token_ids
        assert tokens == expected
        await asyncio.sleep(0.05)
        # The ingress's channel stays open for later requests.
        return tokens, replica.engine.num_free_blocks, used_after_leave, replica.serving_stats()["num_channels"]

    _, free, used_after_leave, num_channels = asyncio.run(run())
    assert "leaver" not in used_after_leave and "stayer" in used_after_leave
    assert free == replica.engine.num_total_blocks
    assert num_channels == 1


def test_a_bad_request_is_refused_though_it_ended_before_the_channel_opened(make_replica):
    # Its only item (an error) waits in the replica's outbox for the channel its Accepted opens.
    replica = make_replica()

    async def run() -> None:
        await ReplicaCalls(ChannelHub(LocalHandle(replica))).open_streams([_request("big", max_tokens=10**6)])

    with pytest.raises(APIError) as refused:
        asyncio.run(run())
    assert refused.value.status_code == 400 and "max_tokens" in refused.value.message


def test_an_outbox_nobody_reads_goes_after_its_ttl():
    from pagedserve.serve_app.stream_channel import Outboxes

    now = [0.0]
    outboxes = Outboxes(orphan_ttl_s=60, clock=lambda: now[0])
    with outboxes.request("gone") as outbox:
        outbox.put("r", ReplicaError(400, "invalid_request_error", "bad"))
    with outboxes.request("alive"):
        pass
    assert outboxes.get("gone").num_waiting_items == 1  # kept for a channel that may still come
    with outboxes.request("gone"):
        pass
    now[0] = 61.0
    outboxes.get("alive")
    assert set(outboxes._by_ingress) == {"alive"}


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_a_lost_channel_ends_its_requests_as_lost_and_they_go_on_elsewhere(make_replica, monkeypatch, transport):
    import pagedserve.serve_app.replica_calls as replica_calls

    monkeypatch.setattr(replica_calls, "RETRY_BACKOFF_S", 0.0)
    first, second = make_replica("r1"), make_replica("r2")

    async def run() -> tuple[list[int], list[int]]:
        expected = await _expected_tokens(first, 30)
        handle = LocalHandle(first, second)
        hub = ChannelHub(handle, transport=transport)
        calls = ReplicaCalls(hub)
        (prompt,) = await calls.open_streams([_request("moving", max_tokens=30)])
        tokens: list[int] = []
        async for item in prompt.items():
            tokens += item.outputs[0].token_ids
            if len(tokens) >= 3 and "r1" in handle.replicas:
                del handle.replicas["r1"]  # r1 can no longer be reached ...
                if transport == "ray":
                    channel = handle.calls[1]  # (the first request's call, then r1's channel)
                    channel.cancel()  # ... and its channel call fails, as Ray ends a call to a dead replica
                else:
                    first._channel_server.close()  # ... and its connections drop, as a dead process's do
        return tokens, expected

    tokens, expected = asyncio.run(run())
    assert tokens == expected  # the continuation on r2 went on from the tokens received


def test_channel_lost_counts_as_a_lost_replica():
    assert replica_lost(ChannelLostError("gone"))
    wrapped = ChannelLostError("failed")
    wrapped.__cause__ = ValueError("transport")
    assert replica_lost(wrapped)


def test_an_inbox_merges_what_a_slow_reader_has_not_taken():
    from pagedserve.engine.core.request import CompletionOutput

    def delta(token: int, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", None, [], [CompletionOutput(0, str(token), [token], logprobs=None,
                                                              finish_reason="length" if finished else None)], finished)

    async def run() -> list[Any]:
        inbox = Inbox()
        for token in range(3):
            inbox.put(delta(token))
        first = await inbox.get()
        inbox.put(delta(3))
        inbox.put(delta(4))
        inbox.put(delta(5, finished=True))
        inbox.put(delta(6))  # after the last item: dropped
        return [first, await inbox.get(), await inbox.get()]

    first, second, end = asyncio.run(run())
    assert first.outputs[0].token_ids == [0, 1, 2] and first.outputs[0].text == "012"
    assert second.finished and second.outputs[0].token_ids == [3, 4, 5]  # the last delta merged in too
    assert end is not None and not isinstance(end, RequestOutput)


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_an_idle_channel_ends_so_its_replica_can_drain_and_requests_that_race_it_get_every_token(make_replica,
                                                                                                  transport):
    """A replica ends an ingress's channel once no request of that ingress is left on it (after
    `channel_idle_s`; 1 ms here, so that requests keep landing while a channel is closing): each request
    still gets every token (the ingress reopens the channel for one that landed meanwhile), and in the end
    no channel is left open, which a replica that Serve removes waits for."""
    replica = make_replica()
    replica.outboxes.channel_idle_s = 0.001

    async def run() -> tuple[list, list[int], int, int, int]:
        expected = await _expected_tokens(replica, 3)
        handle = LocalHandle(replica)
        hub = ChannelHub(handle, transport=transport)
        calls = ReplicaCalls(hub)

        async def staggered(index: int) -> tuple[list[int], int]:
            await asyncio.sleep(0.015 * index)  # a request takes about as long: some overlap, some do not
            return await _tokens(calls, _request(f"r{index}", max_tokens=3))

        results = await asyncio.gather(*(staggered(i) for i in range(40)))
        for _ in range(200):
            if replica.serving_stats()["num_channels"] == 0 and not hub._channels:
                break
            await asyncio.sleep(0.01)
        num_channels_opened = len(handle.calls) - 40 if transport == "ray" else len(handle.address_calls)
        return results, expected, replica.serving_stats()["num_channels"], len(hub._channels), num_channels_opened

    results, expected, open_on_replica, open_on_ingress, num_channels_opened = asyncio.run(run())
    assert all(tokens == expected for tokens, _ in results)
    assert open_on_replica == 0 and open_on_ingress == 0
    assert num_channels_opened > 1  # channels did close between requests
