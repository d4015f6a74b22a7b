"""The ingress's calls into the engine replicas: start one engine request per prompt (routed by
`FreeBlocksRequestRouter`), send it again when its replica is lost before anything reached the client,
and merge several prompts' streams. HTTP-free but for the `APIError`s it raises."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from pagedserve.engine.request import RequestOutput, merge_delta

from .api_errors import as_api_error, replica_lost, unwrap
from .replica import GenerateRequest, ReplicaError

logger = logging.getLogger("ray.serve")

# A request whose replica is lost (its process died, or its engine did) before anything of it reached the
# client is sent again, to whichever replica the router picks then: up to this many attempts in all, the
# next one after RETRY_BACKOFF_S x attempt (the router drops a dead replica within about a second).
MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5


class ReplicaCalls:
    """Engine requests over the `EngineReplica` deployment handle, one stream per prompt."""

    def __init__(self, replica: DeploymentHandle, on_resend: Callable[[], None] | None = None) -> None:
        self.replica = replica
        self.on_resend = on_resend  # counts each request sent again (the ingress's metrics)
        # time.monotonic() of the last output any replica sent this ingress (None: none yet). Outputs that
        # keep arriving show a replica serving, without asking one (see the ingress's /health).
        self.last_output_s: float | None = None

    def _received(self, item: Any) -> Any:
        if isinstance(item, RequestOutput) and item.error is None:  # a failed request proves nothing
            self.last_output_s = time.monotonic()
        return item

    def start(self, request: GenerateRequest) -> Any:
        """Send one engine request. Ray keys router bookkeeping (`on_request_completed`) by the caller's
        internal request id, which every call made while serving one HTTP request shares; give each
        engine request its own, so the router's per-request block reservations never collide."""

        def call() -> Any:
            current = serve_context._get_serve_request_context()
            if current is not None:
                serve_context._serve_request_context.set(
                    dataclasses.replace(current, _internal_request_id=request.request_id)
                )
            return self.replica.options(stream=True).generate.remote(request)

        return contextvars.copy_context().run(call)

    async def _retry_or_raise(self, request: GenerateRequest, attempt: int, error: BaseException | ReplicaError) -> None:
        """Return (after the backoff) when `error` lost the replica and attempts remain; else raise it."""
        if attempt + 1 >= MAX_ATTEMPTS or not replica_lost(error):
            raise as_api_error(error)
        logger.warning("request %s: replica lost (%s); sending it again (attempt %d of %d)", request.request_id,
                       error.message if isinstance(error, ReplicaError) else type(unwrap(error)).__name__,
                       attempt + 2, MAX_ATTEMPTS)
        if self.on_resend is not None:
            self.on_resend()
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

    async def open_streams(self, requests: list[GenerateRequest]) -> tuple[list[Any], list[Any]]:
        """`open_stream` for each prompt at once; on any error the others are cancelled and it is raised."""
        results = await asyncio.gather(*(self.open_stream(r) for r in requests), return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.cancel([stream for stream, _ in opened])
            raise failed[0]
        return [stream for stream, _ in opened], [first for _, first in opened]

    async def collect(self, request: GenerateRequest) -> RequestOutput | None:
        """One prompt's whole output, for a non-streaming response. Nothing of it reaches the client before
        the end, so a replica lost at any point costs only time: the request is sent again from the start."""
        for attempt in range(MAX_ATTEMPTS):
            stream = self._attempt(request, attempt)
            output: RequestOutput | None = None
            failure: BaseException | ReplicaError | None = None
            try:
                async for item in stream:
                    self._received(item)
                    if isinstance(item, ReplicaError):
                        failure = item
                        break
                    output = merge_delta(output, item)
            except Exception as exc:  # noqa: BLE001 -- mapped to an HTTP error unless retried
                failure = exc
            finally:
                self.cancel([stream])
            if failure is None:
                return output
            await self._retry_or_raise(request, attempt, failure)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def cancel(streams: list[Any]) -> None:
        for stream in streams:
            try:
                stream.cancel()
            except Exception:
                pass

    async def merged(self, streams: list[Any], firsts: list[Any]) -> AsyncIterator[tuple[int, Any]]:
        """Yield (prompt index, item) from several replica streams as items arrive."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        done = object()

        async def pump(index: int, stream: Any, first: Any) -> None:
            try:
                if first is not None:
                    await queue.put((index, first))
                    async for item in stream:
                        await queue.put((index, self._received(item)))
            except Exception as exc:
                await queue.put((index, exc))
            finally:
                await queue.put((index, done))

        tasks = [asyncio.create_task(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
