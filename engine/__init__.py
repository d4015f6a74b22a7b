"""The paged-KV-cache continuous-batching engine: requests, scheduler, model runner, sampler."""

from pagedserve.engine.errors import EngineDeadError, EngineError, InvalidRequestError, RequestTooLargeError
from pagedserve.engine.core.request import CompletionOutput, Continuation, FinishReason, Logprob, RequestOutput, SamplingParams



def __getattr__(name: str):
    # The model-facing classes import torch and transformers: load them on first use only.
    if name == "LLM":
        from pagedserve.engine.llm import LLM

        return LLM
    if name == "AsyncLLMEngine":
        from pagedserve.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(name)


__all__ = [
    "AsyncLLMEngine",
    "LLM",
    "CompletionOutput",
    "Continuation",
    "EngineDeadError",
    "EngineError",
    "FinishReason",
    "InvalidRequestError",
    "Logprob",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]
