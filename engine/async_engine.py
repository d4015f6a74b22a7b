"""`AsyncLLMEngine`: the engine behind an asyncio API, for servers.

The blocking step loop runs on its own thread, never on the event loop. Callers talk to it through a
command queue (add, abort) and receive `RequestOutput` deltas on per-request asyncio queues. A caller
that stops iterating (client gone, task cancelled) aborts its request, and its blocks are freed before
the next step. A failure of one step fails that step's requests; a failure of the loop itself marks
the engine dead, fails every open stream with `EngineDeadError`, and `check_health` reports it so that
the server can be replaced.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.config.engine import EngineConfig

from .errors import EngineDeadError, InvalidRequestError
from .llm_engine import LLMEngine
from .request import RequestOutput, SamplingParams, merge_delta
from .stats import EngineStats, StepStats

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[tuple[str, Any]] = deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._dead_reason: str | None = None
        self._stopping = False
        self._stats = engine.get_stats()
        self._step_listeners: list[Callable[[StepStats, EngineStats], None]] = []
        self._finish_listeners: list[Callable[[RequestOutput], None]] = []
        self._thread = threading.Thread(target=self._run_loop, name="pagedserve-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "AsyncLLMEngine":
        return cls.from_config(EngineConfig.create(**kwargs))

    # ---- properties ----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    def add_step_listener(self, listener: Callable[[StepStats, EngineStats], None]) -> None:
        """Called on the loop thread after every step (metrics); must be quick and never raise."""
        self._step_listeners.append(listener)

    def add_finish_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Called on the loop thread with the last delta of every finished request."""
        self._finish_listeners.append(listener)

    # ---- API -----------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request. Bad requests raise before the first yield."""
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        # Validation is read-only on the engine, so it runs here and raises to the caller at once.
        prompt_token_ids = self.engine.encode_prompt(prompt)
        self.engine.validate_request(prompt_token_ids, sampling_params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._streams[request_id] = stream
        text = prompt if isinstance(prompt, str) else None
        self._send(("add", (request_id, text, prompt_token_ids, sampling_params)))
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
                self._send(("abort", request_id))
            with self._streams_lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def get_stats(self) -> EngineStats:
        """The snapshot taken after the latest step (thread-safe, never blocks)."""
        return self._stats

    async def check_health(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if not self._thread.is_alive() and not self._stopping:
            raise EngineDeadError("the engine loop thread is not running")
        self.engine.check_health()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.engine.shutdown()  # the loop steps no more: tensor-parallel workers can stop

    # ---- loop thread ---------------------------------------------------------------------------
    def _send(self, command: tuple[str, Any]) -> None:
        self._commands.append(command)
        self._wakeup.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their callers: one wake-up of each caller's event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, str, Any]]] = {}
        with self._streams_lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, request_id, item))
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, entries)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                self._commands.extend(("abort", request_id) for _, request_id, _ in entries)

    def _apply_commands(self) -> None:
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "add":
                request_id, text, prompt_token_ids, params = payload
                with self._streams_lock:
                    still_wanted = request_id in self._streams
                if not still_wanted:
                    continue  # the caller left before the request started
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params, prompt_text=text)
                except Exception as exc:  # noqa: BLE001 - handed to the one caller it concerns
                    self._deliver(request_id, exc)
            elif kind == "abort":
                self.engine.abort(payload)

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.get_stats()
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.get_stats()
                self._deliver_all([(output.request_id, output) for output in outputs])
                for output in outputs:
                    if output.finished:
                        for listener in self._finish_listeners:
                            listener(output)
                if self.engine.last_step is not None:
                    for listener in self._step_listeners:
                        listener(self.engine.last_step, self._stats)
        except BaseException as exc:  # noqa: BLE001 - the loop must report its death, never vanish
            logger.exception("engine loop died")
            self._dead_reason = f"engine loop died: {type(exc).__name__}: {exc}"
            with self._streams_lock:
                request_ids = list(self._streams)
            for request_id in request_ids:
                self._deliver(request_id, EngineDeadError(self._dead_reason))


def _put_all(entries: list[tuple[asyncio.Queue, str, Any]]) -> None:
    for queue, _, item in entries:
        queue.put_nowait(item)
