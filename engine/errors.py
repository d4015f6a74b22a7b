"""Typed errors of the engine. The ingress alone maps them to HTTP status codes and OpenAI bodies."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameter, prompt too long); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep `param` when the error crosses a process boundary
        return type(self), (self.message, self.param)


class RequestTooLargeError(InvalidRequestError):
    """Prompt plus max_tokens can never fit: over max_model_len or over the whole KV cache."""


class EngineDeadError(EngineError):
    """The engine's step loop died; no request can make progress until the engine is replaced."""


class ModelLoadError(EngineError):
    """The model, tokenizer or draft model a config names cannot be read: a path that is not there, a folder
    that holds no model, a hub id that cannot be reached and is not cached. The message names the setting
    and its value; the cause (transformers' error) is chained."""


class RequestFailedError(EngineError):
    """One request failed inside the engine; the others go on."""
