"""The ingress's calls into the engine replicas: start one engine request per prompt (routed by
`FreeBlocksRequestRouter`; its deltas come through the stream channel, serve_app/stream_channel.py), keep
each prompt's output coming when the replica under it is lost (sent again before anything of it arrived;
continued from the tokens that did arrive after that), and merge several prompts' streams. HTTP-free but
for the `APIError`s it raises."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Callable, Protocol

from pagedserve.engine.core.request import Continuation, RequestOutput, merge_delta

from pagedserve.serve_app.api_errors import as_api_error, replica_lost, unwrap
from pagedserve.serve_app.messages import GenerateRequest, ReplicaError

logger = logging.getLogger("ray.serve")

# A request whose replica is lost (its process died, or its engine did) is sent to whichever replica the
# router picks then: before its first item, up to this many attempts in all; after that, each unfinished
# completion goes on from its tokens so far (a `Continuation`), up to MAX_ATTEMPTS - 1 times a prompt.
# Attempt k waits RETRY_BACKOFF_S x k first (the router drops a dead replica within about a second).
MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5
END_GRACE_S = 5.0  # a complete prompt's replica calls end by themselves; one still open this long after is cancelled

_DONE = object()  # one of a `_Merge`'s iterables has ended


class _Merge:
    """Items of several async iterables as they arrive, each tagged with its key; one may join while the
    others run. An exception an iterable raises comes as its item; `_DONE` then says it has ended."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    def add(self, key: Any, items: AsyncIterator[Any]) -> asyncio.Task:
        async def pump() -> None:
            try:
                async for item in items:
                    await self._queue.put((key, item))
            except Exception as exc:  # noqa: BLE001 -- an item like any other: the reader decides
                await self._queue.put((key, exc))
            finally:
                await self._queue.put((key, _DONE))

        task = asyncio.create_task(pump())
        self._tasks.append(task)
        return task

    async def next(self) -> tuple[Any, Any]:
        return await self._queue.get()

    def next_nowait(self) -> tuple[Any, Any] | None:
        """The next item if one has arrived, else None."""
        return None if self._queue.empty() else self._queue.get_nowait()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


@dataclasses.dataclass
class _Part:
    """One engine request serving some of a prompt's completions: all of them (`index` None, the first
    request) or completion `index` alone (a continuation, whose outputs carry index 0)."""

    stream: Any
    index: int | None
    task: asyncio.Task | None = None


class PromptStream:
    """One prompt's engine output as it arrives: `RequestOutput` deltas, then at most one error item (a
    `ReplicaError` or an exception) that ends it. A lost replica does not end it: each completion not
    finished goes on elsewhere from the tokens that reached this ingress (which are exactly what the
    client has), and its deltas keep their completion index. Only `finished` of the last delta is set."""

    def __init__(self, calls: "ReplicaCalls", request: GenerateRequest, stream: Any, first: Any) -> None:
        self._calls = calls
        self.request = request
        self._first = (stream, first)
        self._parts: list[_Part] = []
        n = request.sampling_params.n
        self._token_ids: list[list[int]] = [[] for _ in range(n)]
        self._cumulative_logprobs: list[float] = [0.0] * n
        self._finished = [False] * n
        self._num_resumes = 0
        self._closed = False
        self._merge = _Merge()  # the parts' items

    async def items(self) -> AsyncIterator[Any]:
        stream, first = self._first
        self._start(_Part(stream, None), first)
        complete = False
        try:
            while self._parts:
                part, item = await self._merge.next()
                if item is _DONE:
                    if part in self._parts:
                        self._parts.remove(part)
                    continue
                if part not in self._parts:
                    continue  # a part given up on (lost, then continued elsewhere): its last items are stale
                if isinstance(item, RequestOutput):
                    output = self._received(part, item)
                    if output.finished:
                        complete = True
                    yield output
                    if complete:
                        return
                    continue
                if self._num_resumes + 1 < MAX_ATTEMPTS and replica_lost(item) and not self._closed:
                    error = await self._continue_elsewhere(part, item)
                    if error is None:
                        continue
                    item = error
                yield item
                return
        finally:
            if complete:
                self._let_parts_end()
            else:
                self.cancel()

    def _start(self, part: _Part, first: Any) -> None:
        part.task = self._merge.add(part, self._part_items(part, first))
        self._parts.append(part)

    async def _part_items(self, part: _Part, first: Any) -> AsyncIterator[Any]:
        if first is None:  # the call ended before any item
            return
        yield first
        async for item in part.stream:
            yield self._calls._received(item)

    def _received(self, part: _Part, output: RequestOutput) -> RequestOutput:
        """Record a part's delta and return it as a delta of the whole prompt."""
        completions = []
        for completion in output.outputs:
            index = completion.index if part.index is None else part.index
            if part.index is not None:
                completion = dataclasses.replace(completion, index=index)
            self._token_ids[index].extend(completion.token_ids)
            if completion.cumulative_logprob is not None:
                self._cumulative_logprobs[index] = completion.cumulative_logprob
            if completion.finished():
                self._finished[index] = True
            completions.append(completion)
        if output.finished and part.index is None:
            self._finished = [True] * len(self._finished)  # the whole request ended (also by an error)
        # An engine error ends the prompt, as it ends every completion of a request that fails.
        finished = all(self._finished) or output.error is not None
        if part.index is None and finished == output.finished:
            return output  # the first request's own delta, as it came (the usual case: nothing was lost)
        return dataclasses.replace(output, request_id=self.request.request_id, outputs=completions,
                                   finished=finished)

    async def _continue_elsewhere(self, part: _Part, error: Any) -> Any:
        """Give up `part`, whose replica was lost, and start each of its unfinished completions on another
        replica from the tokens received; returns the error that ends the prompt if that fails, else None."""
        self._parts.remove(part)
        self._calls.cancel([part.stream])
        indices = [i for i in (range(len(self._finished)) if part.index is None else [part.index])
                   if not self._finished[i]]
        if not indices:
            return None  # lost after its last delta: nothing of it is missing
        self._num_resumes += 1
        logger.warning("request %s: replica lost (%s) while streaming; completions %s go on from %s tokens "
                       "on another replica (resume %d of %d)", self.request.request_id, _describe(error), indices,
                       [len(self._token_ids[i]) for i in indices], self._num_resumes, MAX_ATTEMPTS - 1)
        self._calls._count_resend()
        await asyncio.sleep(RETRY_BACKOFF_S * self._num_resumes)
        if self._closed:
            return error
        try:
            opened = await self._calls._open_all([self._continuation(i) for i in indices])
        except Exception as exc:  # noqa: BLE001 -- ends this prompt with the reason
            return exc
        if self._closed:
            self._calls.cancel([stream for stream, _ in opened])
            return error
        for index, (stream, first) in zip(indices, opened):
            self._start(_Part(stream, index), first)
        return None

    def _continuation(self, index: int) -> GenerateRequest:
        """Completion `index` as an engine request of its own that goes on from its tokens so far."""
        request = self.request
        params = request.sampling_params
        done = self._token_ids[index]
        # Completion i of a seeded request samples as a request with seed + i (the engine's rule for n > 1).
        seed = None if params.seed is None else params.seed + index
        return dataclasses.replace(
            request,
            request_id=f"{request.request_id}-resume{self._num_resumes}-{index}",
            sampling_params=dataclasses.replace(params, n=1, seed=seed),
            num_prompt_tokens=request.num_prompt_tokens + len(done),
            max_new_tokens=max(0, (params.max_tokens or 0) - len(done)),
            continuation=Continuation(done, self._cumulative_logprobs[index]),
        )

    def cancel(self) -> None:
        """Stop every engine request of this prompt (the client left, or it ended with an error)."""
        self._closed = True
        parts, self._parts = self._parts, []
        _cancel_parts(self._calls, parts)

    def _let_parts_end(self) -> None:
        """The prompt is complete: its replica calls return right after their last delta, so let them end
        by themselves (a cancelled call counts as CANCELLED in Serve's logs, metrics and dashboard although
        it succeeded, and costs the replica a cancellation); any call still open after `END_GRACE_S` is
        cancelled then."""
        self._closed = True
        parts, self._parts = self._parts, []
        open_parts = [part for part in parts if part.task is not None and not part.task.done()]
        if open_parts:
            asyncio.get_running_loop().call_later(END_GRACE_S, _cancel_parts, self._calls, open_parts)


def _cancel_parts(calls: "ReplicaCalls", parts: list[_Part]) -> None:
    parts = [part for part in parts if part.task is None or not part.task.done()]
    calls.cancel([part.stream for part in parts])
    for part in parts:
        if part.task is not None:
            part.task.cancel()


def _describe(error: Any) -> str:
    return error.message if isinstance(error, ReplicaError) else type(unwrap(error)).__name__


class EngineRequests(Protocol):
    """Starts engine requests: `ChannelHub` (serve_app/stream_channel.py) in the service."""

    def start(self, request: GenerateRequest) -> Any:
        """Send `request`; returns an async iterator of its items with a `cancel()` method."""


class ReplicaCalls:
    """Engine requests on the engine replicas, one stream per prompt."""

    def __init__(self, requests: EngineRequests, on_resend: Callable[[], None] | None = None) -> None:
        self.requests = requests
        self.on_resend = on_resend  # counts each request sent again (the ingress's metrics)
        # time.monotonic() of the last output any replica sent this ingress (None: none yet). Outputs that
        # keep arriving show a replica serving, without asking one (see the ingress's /health).
        self.last_output_s: float | None = None

    def _received(self, item: Any) -> Any:
        if isinstance(item, RequestOutput) and item.error is None:  # a failed request proves nothing
            self.last_output_s = time.monotonic()
        return item

    def start(self, request: GenerateRequest) -> Any:
        return self.requests.start(request)

    def _count_resend(self) -> None:
        if self.on_resend is not None:
            self.on_resend()

    async def _retry_or_raise(self, request: GenerateRequest, attempt: int, error: BaseException | ReplicaError) -> None:
        """Return (after the backoff) when `error` lost the replica and attempts remain; else raise it."""
        if attempt + 1 >= MAX_ATTEMPTS or not replica_lost(error):
            raise as_api_error(error)
        logger.warning("request %s: replica lost (%s); sending it again (attempt %d of %d)", request.request_id,
                       _describe(error), attempt + 2, MAX_ATTEMPTS)
        self._count_resend()
        await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))

    def _attempt(self, request: GenerateRequest, attempt: int) -> Any:
        # A new id per attempt: the router's block reservations are keyed by it.
        return self.start(request if attempt == 0 else dataclasses.replace(
            request, request_id=f"{request.request_id}-retry{attempt}"))

    async def open_stream(self, request: GenerateRequest) -> tuple[Any, Any]:
        """Start one engine request and wait for its first item, so that routing refusals and bad requests
        become HTTP errors; sent again while its replica is lost before that item. (stream, first item)."""
        for attempt in range(MAX_ATTEMPTS):
            stream = self._attempt(request, attempt)
            try:
                first = self._received(await stream.__anext__())
            except StopAsyncIteration:
                return stream, None
            except Exception as exc:  # noqa: BLE001 -- mapped to an HTTP error unless retried
                self.cancel([stream])
                await self._retry_or_raise(request, attempt, exc)
                continue
            if isinstance(first, ReplicaError):
                self.cancel([stream])
                await self._retry_or_raise(request, attempt, first)
                continue
            return stream, first
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _open_all(self, requests: list[GenerateRequest]) -> list[tuple[Any, Any]]:
        """`open_stream` for each request at once; on any error the others are cancelled and it is raised."""
        results = await asyncio.gather(*(self.open_stream(r) for r in requests), return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.cancel([stream for stream, _ in opened])
            raise failed[0]
        return opened

    async def open_streams(self, requests: list[GenerateRequest]) -> list[PromptStream]:
        """Each prompt's `PromptStream`, once every one has its first item (errors are raised as `open_stream`
        raises them, after the others are cancelled)."""
        opened = await self._open_all(requests)
        return [PromptStream(self, request, stream, first) for request, (stream, first) in zip(requests, opened)]

    async def collect(self, request: GenerateRequest) -> RequestOutput | None:
        """One prompt's whole output, for a non-streaming response (its deltas merged); a lost replica costs
        only time, as for a stream."""
        (prompt,) = await self.open_streams([request])
        output: RequestOutput | None = None
        async for item in prompt.items():
            if not isinstance(item, RequestOutput):
                raise as_api_error(item)
            output = merge_delta(output, item)
        return output

    @staticmethod
    def cancel(streams: list[Any]) -> None:
        """Cancel replica calls (handle responses) or `PromptStream`s."""
        for stream in streams:
            try:
                stream.cancel()
            except Exception:
                pass

    async def merged(self, prompts: list[PromptStream]) -> AsyncIterator[tuple[int, Any]]:
        """Yield (prompt index, item) from several prompts' streams as items arrive. A reader that falls
        behind (or waits on purpose) gets each prompt's deltas that arrived meanwhile as one."""
        merge = _Merge()
        for index, prompt in enumerate(prompts):
            merge.add(index, prompt.items())
        try:
            remaining = len(prompts)
            while remaining:
                arrived = [await merge.next()]
                while (following := merge.next_nowait()) is not None:
                    arrived.append(following)
                for index, item in _coalesced(arrived):
                    if item is _DONE:
                        remaining -= 1
                        continue
                    yield index, item
        finally:
            merge.cancel()


def _coalesced(arrived: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """The same items with each prompt's consecutive deltas folded into one (into a fresh object: the
    deltas themselves are left as they came); order is kept around anything that is not a delta (an error,
    the end of a prompt), and nothing folds across one."""
    result: list[tuple[int, Any]] = []
    open_delta: dict[int, int] = {}  # prompt index -> position in `result` of the delta being folded into
    fresh: set[int] = set()  # positions that already hold a folded copy
    for index, item in arrived:
        position = open_delta.get(index)
        if not isinstance(item, RequestOutput):
            open_delta.pop(index, None)
            result.append((index, item))
        elif position is None:
            open_delta[index] = len(result)
            result.append((index, item))
        else:
            folded = result[position][1]
            if position not in fresh:
                folded = merge_delta(None, folded)
                fresh.add(position)
            result[position] = (index, merge_delta(folded, item))
    return result
