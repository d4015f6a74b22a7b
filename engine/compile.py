"""torch.compile of the model forward that eager steps run, with a fallback ladder.

The config asks for one way to compile (`compile_fullgraph`, `compile_dynamic`, `compile_mode`,
`compile_backend`). Not every model compiles every way: a graph break fails `fullgraph=True`, a backend
may reject an op. torch.compile is lazy, so such failures surface on the first call, not at wrap time.
`CompiledForward` therefore tries the configured options, then the usual remedy (fullgraph off, dynamic
shapes on), then eager, logging a warning at each step down; the step that failed is rerun on the next
rung (a forward only rewrites the same KV slots with the same values, so a rerun is harmless).

CUDA-graph replay does not go through here: decode graphs capture the eager model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.config.engine import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    fullgraph: bool
    dynamic: bool | None
    mode: str | None
    backend: str

    def describe(self) -> str:
        return f"backend={self.backend!r}, mode={self.mode!r}, fullgraph={self.fullgraph}, dynamic={self.dynamic}"


def compile_ladder(config: EngineConfig) -> list[CompileOptions]:
    """The configured options first, then fullgraph off with dynamic shapes on (if that differs)."""
    wanted = CompileOptions(config.compile_fullgraph, config.compile_dynamic, config.compile_mode, config.compile_backend)
    relaxed = CompileOptions(False, True, config.compile_mode, config.compile_backend)
    return [wanted] if relaxed == wanted else [wanted, relaxed]


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


class CompiledForward:
    """Callable like the model; owns the current rung of the ladder. Eager once every rung failed."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig) -> None:
        self.model = model
        self._ladder = compile_ladder(config) if config.compile else []
        self._forward: Callable[..., Any] = model
        self.options: CompileOptions | None = None  # None: eager
        self._next_rung()

    @property
    def is_compiled(self) -> bool:
        return self.options is not None

    def _next_rung(self, reason: str | None = None) -> None:
        failed = self.options
        while self._ladder:
            options = self._ladder.pop(0)
            try:
                self._forward = torch.compile(
                    self.model, fullgraph=options.fullgraph, dynamic=options.dynamic, mode=options.mode,
                    backend=options.backend,
                )
            except Exception as error:  # noqa: BLE001 -- bad backend or mode names fail here, before any call
                logger.warning("torch.compile(%s) refused: %s", options.describe(), _first_line(error))
                continue
            self.options = options
            if failed is not None:
                logger.warning("torch.compile(%s) failed (%s); retrying with %s",
                               failed.describe(), reason, options.describe())
            else:
                logger.info("model forward compiled lazily with %s", options.describe())
            return
        if failed is not None:
            logger.warning("torch.compile(%s) failed (%s); running the model eagerly", failed.describe(), reason)
        self._forward = self.model
        self.options = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return self._forward(*args, **kwargs)
            except _compile_errors() as error:
                if self.options is None:
                    raise
                self._next_rung(_first_line(error))


def _first_line(error: BaseException) -> str:
    # BackendCompilerFailed says only "backend=... raised:"; the backend's own error says why.
    error = getattr(error, "inner_exception", None) or error
    text = f"{type(error).__name__}: {str(error).strip()}"
    return text.splitlines()[0]
