"""Fair admission across API keys (serve_app/fair_queue.py) on the queue object, with a simulated service in
place of Ray's router and the replicas; no Ray. Time is counted in steps of the simulation, not seconds."""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from pagedserve.engine.core.request import RequestOutput, SamplingParams
from pagedserve.serve_app.errors import KeyOverShareError, ServiceOverloadedError
from pagedserve.serve_app.fair_queue import FairAdmission, FairQueue
from pagedserve.serve_app.messages import GenerateRequest


def run(coroutine):
    return asyncio.run(coroutine)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_each_key_has_at_most_its_share_with_the_router_and_waits_in_order():
    async def scenario():
        queue = FairQueue(max_routing_per_key=2, max_waiting=10, timeout_s=60, retry_after_s=1)
        order: list[str] = []

        async def request(key: str, name: str) -> None:
            await queue.enter(key)
            order.append(name)

        tasks = [asyncio.create_task(request("a", f"a{i}")) for i in range(4)]
        tasks.append(asyncio.create_task(request("b", "b0")))
        await settle()
        assert order == ["a0", "a1", "b0"] and queue.num_routing("a") == 2 and queue.num_waiting == 2
        queue.leave("b")  # b's place is b's: a's line does not move
        await settle()
        assert order == ["a0", "a1", "b0"]
        queue.leave("a")
        await settle()
        assert order == ["a0", "a1", "b0", "a2"]
        queue.leave("a")
        queue.leave("a")
        await settle()
        assert order[-1] == "a3" and queue.num_waiting == 0
        await asyncio.gather(*tasks)

    run(scenario())


def test_full_queue_and_timeout_are_overloaded_errors_and_a_cancelled_waiter_hands_on():
    async def scenario():
        queue = FairQueue(max_routing_per_key=1, max_waiting=1, timeout_s=0.05, retry_after_s=3)
        await queue.enter("a")
        waiting = asyncio.create_task(queue.enter("a"))
        await settle()
        with pytest.raises(ServiceOverloadedError) as full:
            await queue.enter("a")  # a must wait, and the one waiting place is taken
        assert full.value.retry_after_s == 3 and "already waiting" in full.value.message
        await queue.enter("b")  # b has a place of its own: no wait
        queue.leave("b")
        with pytest.raises(ServiceOverloadedError, match="within 0.05s"):
            await waiting
        assert queue.num_waiting == 0
        cancelled = asyncio.create_task(queue.enter("a"))
        await settle()
        cancelled.cancel()
        await settle()
        queue.leave("a")
        assert queue.num_routing("a") == 0 and queue.num_waiting == 0

    run(scenario())


# ---- a simulated saturated service ----------------------------------------------------------------------


@dataclass
class _Call:
    """What `ChannelHub.start` returns, as far as `FairAdmission` uses it."""

    request: GenerateRequest
    first: asyncio.Future
    on_accepted: object = None
    is_cancelled: bool = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.first

    def cancel(self) -> None:
        self.is_cancelled = True


@dataclass
class Service:
    """Ray's router and the replicas: requests sent wait in one FIFO line; `capacity` run at once, each for
    `run_steps` steps on average (uniform from half to 1.5 times, seeded, so completions spread as real
    lengths do); a request accepted at step s has its first token at s + `prefill_steps`."""

    capacity: int
    run_steps: int
    prefill_steps: int
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    line: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # (end step, call)
    step: int = 0
    max_in_line_per_key: dict = field(default_factory=dict)

    def start(self, request: GenerateRequest) -> _Call:
        call = _Call(request, asyncio.get_running_loop().create_future())
        self.line.append(call)
        key = request.api_key_name
        in_line = sum(1 for c in self.line if c.request.api_key_name == key)
        self.max_in_line_per_key[key] = max(self.max_in_line_per_key.get(key, 0), in_line)
        return call

    def advance(self) -> None:
        self.step += 1
        self.running = [(end, call) for end, call in self.running if end > self.step]
        while self.line and len(self.running) < self.capacity:
            call = self.line.popleft()
            if call.is_cancelled:
                continue
            length = self.rng.randint(self.run_steps // 2, self.run_steps * 3 // 2)
            self.running.append((self.step + length, call))
            if call.on_accepted is not None:
                call.on_accepted()
            call.first.set_result(self.step + self.prefill_steps)  # the step of its first token


def p99(values: list[int]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


async def ttfts_of_calm_key(max_routing_per_key: int | None, flood: bool) -> tuple[list[int], Service]:
    """Key `calm` sends one request every 7 steps; key `flood` (if flooding) keeps 40 requests open at all times,
    far more than the service holds. TTFT of each of calm's requests, in steps."""
    service = Service(capacity=256, run_steps=128, prefill_steps=4)
    requests = service if max_routing_per_key is None else FairAdmission(
        service, FairQueue(max_routing_per_key, max_waiting=1000, timeout_s=3600, retry_after_s=1))
    ttfts: list[int] = []
    open_flood: set[asyncio.Task] = set()

    async def one(key: str, index: int) -> None:
        sent = service.step
        request = GenerateRequest(f"{key}-{index}", [1, 2, 3], SamplingParams(), 3, api_key_name=key)
        first_step = await requests.start(request).__anext__()
        if key == "calm":
            ttfts.append(first_step - sent)

    calm: list[asyncio.Task] = []
    while service.step < 1200 or not all(task.done() for task in calm):
        step = service.step
        while flood and step < 1200 and len(open_flood) < 600:
            task = asyncio.create_task(one("flood", step * 100 + len(open_flood)))
            open_flood.add(task)
            task.add_done_callback(open_flood.discard)
        if step % 7 == 0 and 100 < step < 1200:
            calm.append(asyncio.create_task(one("calm", step)))
        await settle()
        service.advance()
        await settle()
    for task in list(open_flood):
        task.cancel()
    await asyncio.gather(*open_flood, return_exceptions=True)
    return ttfts, service


def test_a_flooding_key_cannot_push_another_keys_p99_ttft_past_twice_its_unloaded_value():
    """Issue 28's bar on the queue object: unloaded, the calm key's TTFT is one step to be placed plus the
    prefill (4 steps); with the other key flooding (600 requests open against room for 256), its p99 stays within
    2x when the ingress hands the router one request per key at a time (here it stays at 5: 1 in the router's
    line per key, so a calm request waits for at most 2 completions). Through the router's plain FIFO line (no
    fair queue) the same flood costs it 335 steps. What the fair queue bounds is the wait, to
    max_routing_per_key + 1 completions of whatever runs: the 2x holds while that many completion intervals fit
    in one unloaded TTFT (here 256 running, 64-192 steps long: 2 completions a step; at 1 a step the p99 was
    11 steps, 2.2x)."""
    unloaded, _ = run(ttfts_of_calm_key(1, flood=False))
    fair, service = run(ttfts_of_calm_key(1, flood=True))
    unfair, _ = run(ttfts_of_calm_key(None, flood=True))
    assert len(fair) == len(unloaded) > 100
    assert p99(unloaded) == 5  # accepted at the next step, then the prefill
    assert p99(fair) <= 2 * p99(unloaded), (p99(fair), sorted(fair)[-5:])
    assert service.max_in_line_per_key["flood"] == 1
    assert p99(unfair) > 5 * p99(unloaded)


class _ScriptedCall:
    """A call whose first item is an over-share refusal, or (once `accept()`ed) a finished output."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.first = asyncio.get_running_loop().create_future()
        self.on_accepted = None
        self.is_cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.first

    def refuse(self) -> None:
        self.first.set_exception(KeyOverShareError("over its share"))

    def accept(self) -> None:
        self.on_accepted()
        self.first.set_result(RequestOutput(self.request.request_id, "", [1], [], finished=True))

    def cancel(self) -> None:
        self.is_cancelled = True


def test_a_request_turned_back_over_its_keys_share_keeps_its_place_and_goes_again_when_the_key_frees():
    """The router's over-share refusal never reaches the client: the request keeps its key's place (the key's
    next one waits behind it, here in the ingress and not in the router's line) and is sent again when a request
    of its key ends, or after share_retry_s; past queue_timeout_s it is a 429 like any wait. What the queue holds
    (waiting and turned back) rides on each request sent, for the autoscaler."""
    async def scenario():
        queue = FairQueue(max_routing_per_key=1, max_waiting=10, timeout_s=30, retry_after_s=1, share_retry_s=30)
        calls: list[_ScriptedCall] = []

        class Hub:
            def start(self, request: GenerateRequest) -> _ScriptedCall:
                calls.append(_ScriptedCall(request))
                return calls[-1]

        turned_back: list[str] = []
        admission = FairAdmission(Hub(), queue, on_turned_back=turned_back.append)
        first = asyncio.create_task(admission.start(GenerateRequest("f0", [1], SamplingParams(), 1,
                                                                    api_key_name="flood")).__anext__())
        second = asyncio.create_task(admission.start(GenerateRequest("f1", [1], SamplingParams(), 1,
                                                                     api_key_name="flood")).__anext__())
        await settle()
        assert [c.request.request_id for c in calls] == ["f0"] and queue.num_held == 1  # f1 waits for the place
        calls[0].refuse()
        await settle()
        assert calls[0].is_cancelled and queue.num_held == 2 and queue.num_routing("flood") == 1
        assert turned_back == ["flood"]  # counted (pagedserve_api_key_turned_back_requests)
        queue.request_ended("flood")  # one of the key's requests ended: f0 goes again at once
        await settle()
        # Under an id of its own (Ray's router keys requests by it), carrying what the queue holds besides it.
        assert [c.request.request_id for c in calls] == ["f0", "f0-share1"]
        assert calls[1].request.num_held_by_ingress == 1
        calls[1].accept()
        assert (await first).finished
        await settle()
        assert [c.request.request_id for c in calls][-1] == "f1" and calls[-1].request.num_held_by_ingress == 0
        calls[-1].accept()
        await second
        assert queue.num_held == 0 and queue.num_routing("flood") == 0

        # Turned back until its time is up: a 429 with Retry-After, and its place goes to the next.
        queue.timeout_s, queue.share_retry_s = 0.05, 0.01
        late = asyncio.create_task(admission.start(GenerateRequest("f2", [1], SamplingParams(), 1,
                                                                   api_key_name="flood")).__anext__())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if calls[-1].request.request_id.startswith("f2") and not calls[-1].first.done():
                calls[-1].refuse()
            if late.done():
                break
        with pytest.raises(ServiceOverloadedError, match="within 0.05s"):
            await late
        assert sum(c.request.request_id.startswith("f2") for c in calls) >= 2 and queue.num_routing("flood") == 0

        # Turned back, a request waits within max_queued_requests as those in the lines do.
        queue.max_waiting, queue.timeout_s = 0, 30
        full = asyncio.create_task(admission.start(GenerateRequest("f3", [1], SamplingParams(), 1,
                                                                   api_key_name="flood")).__anext__())
        await settle()
        calls[-1].refuse()
        with pytest.raises(ServiceOverloadedError, match="already waiting"):
            await full

    run(scenario())
