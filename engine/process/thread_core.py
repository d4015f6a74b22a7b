"""`ThreadCore`: the engine core on a thread of this process (the default on CPU).

Commands reach the loop through a deque (`QueuedCommands`); the loop steps while there is work and
sleeps on an event when idle, reporting an idle heartbeat once a second.
"""

from __future__ import annotations

import logging
import threading

from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.protocol import CoreSink, QueuedCommands, apply_command
from pagedserve.engine.core.request import Continuation, SamplingParams
from pagedserve.engine.core.stats import EngineStats
from pagedserve.engine.errors import EngineDeadError

logger = logging.getLogger(__name__)


class ThreadCore(QueuedCommands):
    """The step loop on a thread of this process; commands reach it through a deque."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self.config = engine.config
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._stopping = False
        self._sink: CoreSink | None = None
        self._thread = threading.Thread(target=self._run_loop, name="pagedserve-engine-loop", daemon=True)

    def initial_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.engine.encode_prompt(prompt)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams,
                         continuation: Continuation | None = None) -> None:
        self.engine.validate_request(prompt_token_ids, params, continuation)

    def start(self, sink: CoreSink) -> None:
        self._sink = sink
        self._thread.start()

    def check_health(self) -> None:
        if not self._thread.is_alive() and not self._stopping:
            raise EngineDeadError("the engine loop thread is not running")
        self.engine.check_health()

    def abandon(self) -> None:
        """A thread cannot be ended: stop it stepping if it ever returns (its process is replaced anyway)."""
        self._stopping = True

    def shutdown(self, timeout_s: float) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.engine.shutdown()  # the loop steps no more: tensor-parallel workers can stop

    def _apply_commands(self, sink: CoreSink) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add" and not sink.is_wanted(command[1]):
                continue  # the caller left before the request started
            refused = apply_command(self.engine, command)
            if refused is not None:
                sink.on_request_error(*refused)

    def _run_loop(self) -> None:
        sink = self._sink
        assert sink is not None
        try:
            while not self._stopping:
                self._apply_commands(sink)
                if not self.engine.has_unfinished_requests():
                    sink.on_step([], self.engine.get_stats(), None)
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                for request_id, error in self.engine.take_refused():
                    sink.on_request_error(request_id, error)
                sink.on_step(outputs, self.engine.get_stats(), self.engine.last_step)
        except BaseException as exc:  # noqa: BLE001 - the loop must report its death, never vanish
            logger.exception("engine loop died")
            sink.on_dead(f"engine loop died: {type(exc).__name__}: {exc}")
