"""Requests, their sampling parameters, states and outputs, shaped as vLLM users expect.

`SamplingParams` and `RequestOutput` are the public types. `Request` is the engine's own record of one
sequence: the scheduler reads and advances `num_computed_tokens` until it catches up with
`num_tokens` (vLLM's rule: one counter covers chunked prefill, prefix hits and preemption).
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.errors import InvalidRequestError

# The id a request holds for its token in flight under async scheduling (the engine replaces it on delivery):
# never a valid id, so an embedding lookup of it fails loudly instead of computing on a wrong token.
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the caller (e.g. client disconnected)
    ERROR = "error"  # failed inside the engine


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on a completion's text, under vLLM's names: exactly one of `json` (a JSON schema, as a
    dict or its text), `json_object` (any JSON object), `regex`, `choice` (one of these strings) or
    `grammar` (EBNF). `param` is the API field it came from, named in errors (`response_format`, `tools`)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                f"{self.param}: give exactly one of json, json_object, regex, choice, grammar (got "
                f"{', '.join(given) or 'none'})", param=self.param)
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise InvalidRequestError(f"{self.param}: choice must be a non-empty list of non-empty strings",
                                          param=self.param)
            object.__setattr__(self, "choice", list(self.choice))
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", __import__("json").loads(self.json))
            except ValueError as exc:
                raise InvalidRequestError(f"{self.param}: the JSON schema is not JSON: {exc}", param=self.param) from None
        if self.json is not None and not isinstance(self.json, dict):
            raise InvalidRequestError(f"{self.param}: a JSON schema must be an object", param=self.param)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{self.param}: {name} must be a non-empty string", param=self.param)

    @property
    def is_json(self) -> bool:
        return self.json is not None or self.json_object

    @property
    def kind(self) -> str:
        return "JSON schema" if self.json is not None else "JSON object" if self.json_object else (
            "regex" if self.regex is not None else "choice" if self.choice is not None else "grammar")


@dataclass
class SamplingParams:
    """How to sample one prompt's completions. Defaults follow vLLM (temperature 1.0, max_tokens 16)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # no EOS, stop id or stop string ends a completion before it has this many tokens
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the sampled token's)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constraints on which tokens may come (OpenAI's logit_bias; vLLM's allowed_token_ids, bad_words and
    # structured outputs).
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never produced (their last token is banned after the others)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            try:
                self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise InvalidRequestError("logit_bias maps token ids to numbers", param="logit_bias") from None
        else:
            self.logit_bias = None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.bad_words = list(self.bad_words or [])
        self._check()

    @functools.cached_property
    def logit_bias_tensors(self) -> tuple[Any, Any] | None:
        """`logit_bias` as host tensors (token ids int64, biases float32), built once: the sampler adds them to the
        request's rows every step without a Python loop over the entries."""
        if not self.logit_bias:
            return None
        import torch

        return (torch.tensor(list(self.logit_bias), dtype=torch.int64),
                torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    def _check(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0.0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be >= 0 (0 or -1 disables), got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, "repetition_penalty",
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be non-negative integers"),
            (self.seed is None or isinstance(self.seed, int), "seed", f"seed must be an integer, got {self.seed!r}"),
            (all(t >= 0 and -100.0 <= b <= 100.0 for t, b in (self.logit_bias or {}).items()), "logit_bias",
             "logit_bias maps non-negative token ids to biases in [-100, 100]"),
            (self.allowed_token_ids is None or (bool(self.allowed_token_ids) and all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)), "allowed_token_ids",
             "allowed_token_ids must be a non-empty list of non-negative integers"),
            (all(isinstance(w, str) and w for w in self.bad_words), "bad_words", "bad_words must be non-empty strings"),
            (self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "structured_outputs", "structured_outputs must be a StructuredOutputsParams"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """Sampling reads the values of earlier tokens on the host (the penalties, bad words, a grammar)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.bad_words) or self.structured_outputs is not None)


@dataclass(frozen=True)
class Continuation:
    """What one completion already produced on an engine that was lost (its replica died mid-stream): a
    request that carries one picks up where that engine left off, with `n` = 1.

    The engine recomputes the K/V of prompt + these tokens, counts them as output (`max_tokens`,
    `min_tokens`, penalties), replays them through the detokenizer so that text held back there (the
    start of a possible stop string, an unfinished character) comes out as it would have, advances a
    seeded request's generator past them, and streams only what follows. Greedy and seeded completions
    go on exactly as if nothing had happened.
    """

    output_token_ids: tuple[int, ...]
    cumulative_logprob: float = 0.0  # of these tokens, when logprobs were asked for

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_token_ids", tuple(self.output_token_ids))


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token and the top-n).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One of the n completions of a request. In streaming deltas, text and token_ids are the new part."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # set when finish_reason is "error"


@dataclass
class Request:
    """One sequence inside the engine. With n > 1 each completion is its own `Request` (a child)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None  # the user-visible request id for n > 1 children
    completion_index: int = 0
    # vLLM's request priority: lower is served earlier (only the `priority` scheduling policy reads it).
    priority: int = 0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (first schedule)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: SampleLogprobs = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)
    extra: dict[str, Any] = field(default_factory=dict)
    # prompt + output tokens at which the request ends by length (max_tokens or the model's context);
    # the engine sets it when it accepts the request.
    token_limit: int = 2**62
    # The sequence's grammar matcher (structured outputs; engine/core/grammar.py): it has accepted every
    # output token, in order. None for an unconstrained sequence.
    grammar: Any = None
    # `bad_words` as token id sequences (each word alone and after a space), set by the engine.
    bad_word_ids: list[list[int]] = field(default_factory=list)
    # The LoRA adapter the sequence runs under (None: the base model); it also salts its prefix-cache keys.
    lora_name: str | None = None

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_known_tokens(self) -> int:
        """Its tokens on the host: all but the placeholder of a token in flight."""
        outputs = self.output_token_ids
        return self.num_tokens - (1 if outputs and outputs[-1] == PLACEHOLDER_TOKEN_ID else 0)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_prefill_done(self) -> bool:
        """True once every prompt token is in the cache (the request now decodes)."""
        return self.num_computed_tokens >= self.num_prompt_tokens

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output, without copying the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def max_total_tokens(self, max_model_len: int) -> int:
        """Upper bound of prompt + output tokens this request may reach."""
        max_tokens = self.sampling_params.max_tokens
        if max_tokens is None:
            return max_model_len
        return min(max_model_len, self.num_prompt_tokens + max_tokens)


def merge_delta(full: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold one streamed delta into the accumulated output of its request."""
    if full is None:
        full = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {c.index: c for c in full.outputs}
    for piece in delta.outputs:
        done = by_index.get(piece.index)
        if done is None:
            done = by_index[piece.index] = CompletionOutput(piece.index, "", [], logprobs=None)
        done.text += piece.text
        done.token_ids.extend(piece.token_ids)
        if piece.logprobs is not None:
            done.logprobs = (done.logprobs or []) + piece.logprobs
        done.cumulative_logprob = piece.cumulative_logprob
        done.finish_reason = piece.finish_reason
        done.stop_reason = piece.stop_reason
    full.outputs = [by_index[i] for i in sorted(by_index)]
    if delta.prompt_token_ids:  # a transport may send the prompt with one delta only (the last)
        full.prompt, full.prompt_token_ids = delta.prompt, delta.prompt_token_ids
    full.finished = delta.finished
    full.metrics = delta.metrics
    full.num_cached_tokens = delta.num_cached_tokens
    full.error = delta.error
    return full
