"""torch.compile of the model's repeated blocks, with a fallback ladder.

Regional compilation: each decoder layer (the classes a transformers model names in
`_no_split_modules`) is compiled in place, so one compiled graph serves all layers, compilation takes
seconds instead of minutes, and the paged attention in the middle of each layer runs uncompiled (it is
behind `torch.compiler.disable`: its per-step host values would make every step a recompile). Norms,
rotary embeddings, projections and the MLP fuse into a few kernels. The same compiled layers run the
eager steps and are captured by the decode CUDA graphs. A model that names no such blocks is compiled
whole.

The config asks for one way to compile (`compile_fullgraph`, `compile_dynamic`, `compile_mode`,
`compile_backend`). Not every model compiles every way: a graph break fails `fullgraph=True`, a backend
may reject an op. torch.compile is lazy, so such failures surface on the first call, not at wrap time.
`CompiledForward` therefore tries the configured options, then the usual remedy (fullgraph off, dynamic
shapes on), then eager, logging a warning at each step down; the step that failed is rerun on the next
rung (a forward only rewrites the same KV slots with the same values, so a rerun is harmless).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.config.resolve import CompileSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    fullgraph: bool
    dynamic: bool | None
    mode: str | None
    backend: str
    combo_kernels: bool = False
    dependent_launch: bool = False

    def describe(self) -> str:
        extra = "".join(f", {name}" for name in (self.inductor_options or {}))
        return f"backend={self.backend!r}, mode={self.mode!r}, fullgraph={self.fullgraph}, dynamic={self.dynamic}{extra}"

    @property
    def inductor_options(self) -> dict[str, Any] | None:
        """Inductor's horizontal fusion of independent kernels (the rotary embeddings of q and of k become
        one kernel: fewer launches in a batch-1 decode step, docs/kernels.md), and its
        programmatic dependent launch (engine/kernels/launch.py; inductor applies it on Hopper and newer
        only) where this torch has it. torch.compile takes either a mode or options, so a configured mode
        goes without them."""
        if self.backend != "inductor" or self.mode is not None:
            return None
        options: dict[str, Any] = {}
        if self.combo_kernels:
            options["combo_kernels"] = True
        if self.dependent_launch and _inductor_has_pdl():
            options["triton.enable_pdl"] = True
        return options or None


def _inductor_has_pdl() -> bool:
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, "enable_pdl")


def compile_ladder(settings: CompileSettings, dependent_launch: bool = False) -> list[CompileOptions]:
    """The configured options first, then fullgraph off with dynamic shapes on (if that differs).
    `dependent_launch`: whether the compiled kernels may use PDL (the runner's device supports it and the
    config allows it)."""
    wanted = CompileOptions(settings.fullgraph, settings.dynamic, settings.mode, settings.backend,
                            settings.combo_kernels, dependent_launch)
    relaxed = CompileOptions(False, True, settings.mode, settings.backend, settings.combo_kernels, dependent_launch)
    return [wanted] if relaxed == wanted else [wanted, relaxed]


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def compile_regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to compile one by one, or the whole model when it names none. The rotary
    embedding (cos/sin of the step's positions, once per forward) and the final RMSNorm, outside the
    layers, are regions too: eager, they are a dozen small kernels a step (an fp32 matmul, cos, sin,
    pow, mean, rsqrt, casts) where compiled they are three."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    regions = [module for module in model.modules() if type(module).__name__ in names]
    if not regions:
        return [model]
    inside = {id(sub) for region in regions for sub in region.modules()}
    return regions + [module for module in model.modules() if id(module) not in inside
                      and type(module).__name__.endswith(("RotaryEmbedding", "RMSNorm"))]


# How many graphs torch.compile keeps for one function before it runs that function eagerly for good (torch's
# default: 8). A layer's code object serves every decoder layer and meets a step's variants: one row or many
# (sizes 0 and 1 are specialized), steps with and without adapter rows, the first static then the dynamic
# graph, each of them again for the resumes around the paged attention kept out of the graph. On the H200,
# LoRA W1 went past 8 and its layers ran eager (0.08 of base W1's tokens/s).
RECOMPILE_LIMIT = 64


def raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


class CompiledForward:
    """Callable like the model; owns the current rung of the ladder. Eager once every rung failed."""

    def __init__(self, model: torch.nn.Module, settings: CompileSettings, dependent_launch: bool = False) -> None:
        raise_recompile_limit()
        self.model = model
        self.regions = compile_regions(model)
        self._ladder = compile_ladder(settings, dependent_launch)  # the runner wraps the model only when it compiles
        self.options: CompileOptions | None = None  # None: eager
        self._next_rung()

    @property
    def is_compiled(self) -> bool:
        return self.options is not None

    def uncompile(self) -> None:
        for region in self.regions:
            region._compiled_call_impl = None  # what nn.Module.compile sets; None calls the module eagerly
        self.options = None

    def _next_rung(self, reason: str | None = None) -> None:
        failed = self.options
        self.uncompile()
        while self._ladder:
            options = self._ladder.pop(0)
            try:
                for region in self.regions:
                    region.compile(fullgraph=options.fullgraph, dynamic=options.dynamic, mode=options.mode,
                                   backend=options.backend, options=options.inductor_options)
            except Exception as error:  # noqa: BLE001 -- bad backend or mode names fail here, before any call
                self.uncompile()
                logger.warning("torch.compile(%s) refused: %s", options.describe(), _first_line(error))
                continue
            self.options = options
            if failed is not None:
                logger.warning("torch.compile(%s) failed (%s); retrying with %s",
                               failed.describe(), reason, options.describe())
            else:
                logger.info("%d %s compiled lazily with %s", len(self.regions),
                            type(self.regions[0]).__name__, options.describe())
            return
        if failed is not None:
            logger.warning("torch.compile(%s) failed (%s); running the model eagerly", failed.describe(), reason)
        self.options = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return self.model(*args, **kwargs)
            except _compile_errors() as error:
                if self.options is None:
                    raise
                self._next_rung(_first_line(error))


def _first_line(error: BaseException) -> str:
    # BackendCompilerFailed says only "backend=... raised:"; the backend's own error says why.
    error = getattr(error, "inner_exception", None) or error
    text = f"{type(error).__name__}: {str(error).strip()}"
    return text.splitlines()[0]
