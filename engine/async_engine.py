"""`AsyncLLMEngine`: the engine behind an asyncio API, for servers.

The blocking step loop never runs on the event loop. It runs in an *engine core*: a thread of this
process (`process.thread_core.ThreadCore`, the default on CPU), or a process of its own (`process.client.EngineCoreClient`,
the default on CUDA, `EngineConfig.engine_process`) so that a server's event loop, its transport and
the step loop never take turns on one GIL. Callers talk to the core through commands (add, abort) and
receive `RequestOutput` deltas on per-request asyncio queues. A caller that stops iterating (client
gone, task cancelled) aborts its request, and its blocks are freed before the next step. A failure of
one step fails that step's requests; a failure of the core itself marks the engine dead, fails every
open stream with `EngineDeadError`, and `check_health` reports it so that the server can be replaced.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.protocol import EngineCore
from pagedserve.engine.core.request import Continuation, RequestOutput, SamplingParams, merge_delta
from pagedserve.engine.core.stats import EngineStats, StepStats
from pagedserve.engine.errors import EngineDeadError, InvalidRequestError
from pagedserve.engine.process.thread_core import ThreadCore

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt: str | None
    prompt_token_ids: list[int]


class AsyncLLMEngine:
    def __init__(self, core: LLMEngine | EngineCore) -> None:
        """Serve an engine built in this process (its loop runs on a thread) or a started engine core."""
        self._core: EngineCore = ThreadCore(core) if isinstance(core, LLMEngine) else core
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._dead_reason: str | None = None
        self._stats = self._core.initial_stats()
        self._last_progress_s = time.monotonic()  # the core's latest report (a step, or an idle heartbeat)
        self._step_listeners: list[Callable[[StepStats, EngineStats], None]] = []
        self._finish_listeners: list[Callable[[RequestOutput], None]] = []
        self._lora_names: list[str] = list(self._core.config.lora_modules or {})
        self._tickets = itertools.count()
        self._core.start(self)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        from pagedserve.config.resolve import resolve_engine_process
        from pagedserve.engine.process.client import EngineCoreClient
        from pagedserve.engine.runner.platform import detect_platform

        if resolve_engine_process(config, detect_platform()):
            return cls(EngineCoreClient(config))
        return cls(LLMEngine(config))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "AsyncLLMEngine":
        return cls.from_config(EngineConfig.create(**kwargs))

    # ---- properties ----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._core.model_name

    @property
    def tokenizer(self):
        return self._core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    def add_step_listener(self, listener: Callable[[StepStats, EngineStats], None]) -> None:
        """Called on the core's thread after every step (metrics); must be quick and never raise."""
        self._step_listeners.append(listener)

    def add_finish_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Called on the core's thread with the last delta of every finished request."""
        self._finish_listeners.append(listener)

    # ---- API -----------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
        continuation: Continuation | None = None, priority: int = 0, lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request (`continuation`: tokens its completion already produced on an
        engine that was lost; only what follows streams; `priority`: vLLM's, lower served earlier, with the
        `priority` scheduling policy; `lora`: a loaded LoRA adapter's name). Bad requests raise before the first
        yield (an unknown adapter: as the first item)."""
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        # Validation is read-only on the engine, so it runs here and raises to the caller at once (a core
        # in another process validates when the request arrives there, and the error is the first item).
        prompt_token_ids = self._core.encode_prompt(prompt)
        self._core.validate_request(prompt_token_ids, sampling_params, continuation)
        text = prompt if isinstance(prompt, str) else None
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), text, prompt_token_ids)
        with self._streams_lock:  # under the lock that on_dead takes: a stream never misses the engine's death
            if self._dead_reason is not None:
                raise EngineDeadError(self._dead_reason)
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._streams[request_id] = stream
        self._core.add(request_id, text, prompt_token_ids, sampling_params, continuation, priority, lora)
        finished = False
        try:
            pending_error: BaseException | None = None
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # A consumer that fell behind gets everything that has arrived as one delta, so a slow
                # transport (an HTTP stream, a Ray Serve handle) sends fewer, larger messages.
                while not item.finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    if isinstance(following, BaseException):
                        pending_error = following
                        break
                    item = merge_delta(item, following)
                yield item
                if pending_error is not None:
                    finished = True
                    raise pending_error
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._core.abort(request_id)
            with self._streams_lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._core.abort(request_id)

    # ---- LoRA adapters (vLLM's load_lora_adapter / unload_lora_adapter) -----------------------------
    def lora_names(self) -> list[str]:
        """Adapters loaded on this engine: lora_modules, then those loaded at run time (as the core confirmed)."""
        return list(self._lora_names)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load an adapter between steps; raises what the engine raised (`InvalidRequestError`: LoRA off, the
        name taken, an adapter that cannot run here)."""
        await self._lora_command("load", name, path)
        self._lora_names.append(name)

    async def unload_lora_adapter(self, name: str) -> None:
        await self._lora_command("unload", name)
        self._lora_names.remove(name)

    async def _lora_command(self, action: str, name: str, path: str | None = None) -> None:
        ticket = f"lora-{action}-{next(self._tickets)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), None, [])
        with self._streams_lock:
            if self._dead_reason is not None:
                raise EngineDeadError(self._dead_reason)
            self._streams[ticket] = stream
        try:
            self._core.lora_command(ticket, action, name, path)
            reply = await stream.queue.get()  # None: done; else the engine's error
        finally:
            with self._streams_lock:
                self._streams.pop(ticket, None)
        if reply is not None:
            raise reply

    def update_scheduler(self, **changes: Any) -> None:
        """Change scheduling decisions that size nothing (`max_prefill_tokens_while_decoding`, `policy`) from
        the core's next step on; commands keep their order, so requests added after this call are scheduled
        under it. `ConfigError` at once for a field that cannot change or a bad value."""
        self._core.update_scheduler(**changes)

    def get_stats(self) -> EngineStats:
        """The snapshot taken after the latest step (thread-safe, never blocks)."""
        return self._stats

    async def check_health(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        timeout_s = self._core.config.step_timeout_s
        if self._streams and time.monotonic() - self._last_progress_s > timeout_s:
            # A hung device or tensor-parallel peer never returns: fail its requests and give the device
            # back (a core process is killed), so that the server's replacement can start.
            reason = f"no engine step finished in {timeout_s:g} s (EngineConfig.step_timeout_s): the engine is hung"
            logger.error(reason)
            self.on_dead(reason)
            self._core.abandon()
            raise EngineDeadError(reason)
        try:
            self._core.check_health()
        except EngineDeadError as exc:
            if self._dead_reason is None:  # found here first (a tensor-parallel worker gone while the core steps)
                logger.error("engine is dead: %s", exc)
                self.on_dead(str(exc))
                self._core.abandon()
            raise

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._core.shutdown(timeout_s)

    # ---- CoreSink: called on the core's thread ---------------------------------------------------
    def is_wanted(self, request_id: str) -> bool:
        with self._streams_lock:
            return request_id in self._streams

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats, step: StepStats | None) -> None:
        self._last_progress_s = time.monotonic()
        self._stats = stats
        self._deliver_all([(output.request_id, output) for output in outputs])
        for output in outputs:
            if output.finished:
                for listener in self._finish_listeners:
                    listener(output)
        if step is not None:
            for listener in self._step_listeners:
                listener(step, stats)

    def on_request_error(self, request_id: str, error: BaseException) -> None:
        self._deliver_all([(request_id, error)])

    def on_dead(self, reason: str) -> None:
        with self._streams_lock:
            self._dead_reason = reason
            request_ids = list(self._streams)
        self._deliver_all([(request_id, EngineDeadError(reason)) for request_id in request_ids])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their callers: one wake-up of each caller's event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, str, Any]]] = {}
        with self._streams_lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if isinstance(item, RequestOutput):
                    # A core in another process sends deltas without the prompt; the stream holds it.
                    item.prompt, item.prompt_token_ids = stream.prompt, stream.prompt_token_ids
                by_loop.setdefault(stream.loop, []).append((stream.queue, request_id, item))
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, entries)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                for _, request_id, _ in entries:
                    self._core.abort(request_id)


def _put_all(entries: list[tuple[asyncio.Queue, str, Any]]) -> None:
    for queue, _, item in entries:
        queue.put_nowait(item)
