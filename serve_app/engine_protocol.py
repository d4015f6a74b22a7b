"""`ServingEngine`: what an `EngineReplica` asks of its engine. `AsyncLLMEngine` is one; tests swap in
others through `ServeArgs.engine_class` (`module:Class` with `from_config`), and each must offer all of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.request import Continuation, RequestOutput, SamplingParams
from pagedserve.engine.core.stats import EngineStats, StepStats


@runtime_checkable
class ServingEngine(Protocol):
    model_name: str
    tokenizer: Any
    max_model_len: int

    @classmethod
    def from_config(cls, config: EngineConfig) -> "ServingEngine": ...

    @property
    def is_dead(self) -> bool:
        """The engine can serve no more (its core died or hung): routers skip it until it is replaced."""

    def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                 continuation: Continuation | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def get_stats(self) -> EngineStats: ...

    async def check_health(self) -> None: ...

    def add_step_listener(self, listener: Callable[[StepStats, EngineStats], None]) -> None: ...

    def shutdown(self) -> None: ...
