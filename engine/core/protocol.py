"""The engine-core protocol: what a server's `AsyncLLMEngine` asks of the step loop's home, and what it hears back.

An engine core owns one `LLMEngine` and its step loop, on a thread of this process
(`pagedserve.engine.process.thread_core.ThreadCore`) or in a child process
(`pagedserve.engine.process.client.EngineCoreClient`). Callers queue commands (`add`, `abort`,
`update_scheduler`) that the core applies between steps with `apply_command`; the core reports steps,
refused requests and its own death to a `CoreSink`, from its own thread.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from pagedserve.config.resolve import check_runtime_scheduler_changes
from pagedserve.engine.core.request import Continuation, RequestOutput, SamplingParams
from pagedserve.engine.core.stats import EngineStats, StepStats

if TYPE_CHECKING:
    from pagedserve.config.engine import EngineConfig
    from pagedserve.engine.core.llm_engine import LLMEngine


class CoreSink(Protocol):
    """What an engine core reports to, from its own thread."""

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats, step: StepStats | None) -> None: ...

    def on_request_error(self, request_id: str, error: BaseException) -> None: ...

    def on_dead(self, reason: str) -> None: ...

    def is_wanted(self, request_id: str) -> bool: ...


class EngineCore(Protocol):
    """The step loop's home: `_ThreadCore` here, `core_process.EngineCoreClient` in a child process."""

    config: EngineConfig
    model_name: str
    tokenizer: Any
    max_model_len: int

    def initial_stats(self) -> EngineStats: ...

    def encode_prompt(self, prompt: str | list[int]) -> list[int]: ...

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams,
                         continuation: Continuation | None = None) -> None: ...

    def start(self, sink: CoreSink) -> None: ...

    def add(self, request_id: str, text: str | None, prompt_token_ids: list[int], params: SamplingParams,
            continuation: Continuation | None = None, priority: int = 0, lora: str | None = None) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def lora_command(self, ticket: str, action: str, name: str, path: str | None = None) -> None:
        """Load ("load") or unload ("unload") a LoRA adapter between steps; the reply comes to the sink's
        `on_request_error(ticket, error)`, with None for done."""

    def update_scheduler(self, **changes: Any) -> None: ...

    def check_health(self) -> None: ...

    def abandon(self) -> None:
        """Give up on a core that stopped making progress: end it, if it can be ended."""

    def shutdown(self, timeout_s: float) -> None: ...


class QueuedCommands:
    """What both cores share: `add` and `abort` become command tuples (applied by `apply_command`) queued
    for the thread that hands them on, woken by `_wakeup`."""

    def __init__(self) -> None:
        self._commands: deque[tuple] = deque()
        self._wakeup = threading.Event()

    def add(self, request_id: str, text: str | None, prompt_token_ids: list[int], params: SamplingParams,
            continuation: Continuation | None = None, priority: int = 0, lora: str | None = None) -> None:
        self._queue(("add", request_id, text, prompt_token_ids, params, continuation, priority, lora))

    def lora_command(self, ticket: str, action: str, name: str, path: str | None = None) -> None:
        self._queue(("lora", ticket, action, name, path))

    def abort(self, request_id: str) -> None:
        self._queue(("abort", request_id))

    def update_scheduler(self, **changes: Any) -> None:
        """Checked here, in the caller's thread: a bad change raises to the caller instead of ending the
        core's loop; requests queued after it are scheduled under it."""
        check_runtime_scheduler_changes(changes)
        self._queue(("update_scheduler", changes))

    def _queue(self, command: tuple) -> None:
        self._commands.append(command)
        self._wakeup.set()


def apply_command(engine: LLMEngine, command: tuple) -> tuple[str, Exception] | None:
    """Apply ("add", request_id, text, prompt_token_ids, params, continuation, priority, lora), ("abort",
    request_id), ("update_scheduler", changes) or ("lora", ticket, "load" | "unload", name, path) to the engine,
    the commands of both cores. An add the engine refuses returns (request id, error) for its caller; a LoRA
    command always returns (ticket, error or None), the reply its caller waits for."""
    if command[0] == "add":
        _, request_id, text, prompt_token_ids, params, continuation, priority, lora = command
        try:
            engine.add_request(request_id, prompt_token_ids, params, prompt_text=text, continuation=continuation,
                               priority=priority, lora=lora)
        except Exception as exc:  # noqa: BLE001 - handed to the one caller it concerns
            return request_id, exc
    elif command[0] == "lora":
        _, ticket, action, name, path = command
        try:
            if action == "load":
                engine.add_lora(name, path)
            else:
                engine.remove_lora(name)
        except Exception as exc:  # noqa: BLE001 - handed to the caller waiting for the reply
            return ticket, exc
        return ticket, None
    elif command[0] == "abort":
        engine.abort(command[1])
    elif command[0] == "update_scheduler":
        engine.update_scheduler(**command[1])
    return None
