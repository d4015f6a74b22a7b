"""pagedserve: a paged-KV-cache continuous-batching LLM engine on transformers, served with Ray Serve.

The public face, as vLLM users know it::

    from pagedserve import LLM, SamplingParams, StructuredOutputsParams

`SamplingParams`, `StructuredOutputsParams` and the errors are plain Python. `LLM`, `AsyncLLMEngine` and
`EngineConfig` load on first use, so importing this package (the HTTP ingress does) pulls in neither torch nor
pydantic.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Installed, the layers (config, cache, engine, serve_app, demo) are subpackages in this package's folder, as
# pyproject.toml's package-dir maps them. With a source checkout's root on sys.path (`serve run` from the root,
# `python -m pytest`, a GPU machine that runs the checkout uninstalled), this folder holds only this file and
# the layers are its siblings: look for them there too.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_SOURCE_ROOT, "pyproject.toml")) and os.path.isdir(os.path.join(_SOURCE_ROOT, "engine")):
    __path__.append(_SOURCE_ROOT)  # noqa: F821 - a package's own __path__

from pagedserve.engine.core.request import CompletionOutput, RequestOutput, SamplingParams, StructuredOutputsParams
from pagedserve.engine.errors import EngineDeadError, EngineError, InvalidRequestError, RequestTooLargeError

if TYPE_CHECKING:
    from pagedserve.config.engine import ConfigError, EngineConfig
    from pagedserve.engine.async_engine import AsyncLLMEngine
    from pagedserve.engine.llm import LLM

_LAZY = {
    "LLM": ("pagedserve.engine.llm", "LLM"),
    "AsyncLLMEngine": ("pagedserve.engine.async_engine", "AsyncLLMEngine"),
    "EngineConfig": ("pagedserve.config.engine", "EngineConfig"),
    "ConfigError": ("pagedserve.config.engine", "ConfigError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "ConfigError",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "InvalidRequestError",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
    "StructuredOutputsParams",
]
