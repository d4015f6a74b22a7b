"""The paged-KV-cache continuous-batching engine: requests, scheduler, model runner, sampler."""

from .errors import EngineDeadError, EngineError, InvalidRequestError, RequestTooLargeError
from .request import CompletionOutput, FinishReason, Logprob, RequestOutput, SamplingParams

__all__ = [
    "CompletionOutput",
    "EngineDeadError",
    "EngineError",
    "FinishReason",
    "InvalidRequestError",
    "Logprob",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]
