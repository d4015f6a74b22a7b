"""Structured outputs: a grammar per request (JSON schema, JSON, regex, choice, EBNF), enforced token by token.

xgrammar (chosen over llguidance by measurement, `bench/grammar_backends.py` in docs/benchmarks.md: about a
tenth of llguidance's time a mask, which W1 pays for hundreds of rows a step) compiles a
request's constraint into a `CompiledGrammar` against the model's vocabulary; each sequence then owns a
`GrammarMatcher` that says which tokens may come next (a bitmask of the vocabulary) and advances by the
tokens it is given.

Ownership and life:
- `GrammarCompiler` belongs to one engine. It compiles on a small thread pool of its own, never on the
  step loop, and caches by constraint (xgrammar's compiler cache, keyed by the schema text). A request
  whose grammar is still compiling waits outside the scheduler; a constraint that is invalid, or that has
  not compiled within `compile_timeout_s`, refuses its request with `InvalidRequestError` naming the
  OpenAI field it came from (`response_format`, or a tool), and the engine goes on serving.
- JSON (a schema or any object) never holds a raw control character (RFC 8259), but xgrammar's rule for a
  length-bounded string admits bytes below 0x20 other than CR and LF: a JSON grammar's mask also drops every
  token holding such a byte. Its JSON grammars have fixed separators (no free whitespace), so no valid output needs one.
- A sequence's matcher lives on its `Request` (`Request.grammar`). It has accepted every output token
  of the sequence, in order: the tokens of a `Continuation` when the request starts, then each token as it
  is accepted. Preemption recomputes the KV of tokens the matcher already accepted, so it keeps its state;
  the `n` completions of a request each get their own matcher; a stop string ends the sequence like any
  other finish.
- `fill_bitmask` writes the allowed tokens of the constrained rows of a step; the sampler applies the
  mask to those rows' logits on the logits' device, after the model's forward (CUDA graphs are untouched),
  and unconstrained rows of the same step are not touched at all.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagedserve.engine.core.request import StructuredOutputsParams
from pagedserve.engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 10.0
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise InvalidRequestError(
            "structured outputs need the xgrammar package, which is not installed (pip install xgrammar)",
            param="response_format",
        ) from exc
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (each a JSON-escaped literal)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class CompiledConstraint:
    """A compiled grammar, and a mask its tokens must also pass (JSON: no raw control bytes), if any."""

    def __init__(self, grammar: Any, extra_mask: torch.Tensor | None) -> None:
        self.grammar = grammar
        self.extra_mask = extra_mask


class SequenceGrammar:
    """One sequence's matcher: which tokens may come next, advanced by each token the sequence takes.
    `batch`: its compiler's batch matcher, which fills the masks of many sequences on several threads."""

    def __init__(self, matcher: Any, extra_mask: torch.Tensor | None, batch: Any) -> None:
        self.matcher = matcher
        self.extra_mask = extra_mask
        self.batch = batch

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """The matcher took a stop token: its language allows nothing more, and it has no next mask."""
        return self.matcher.is_terminated()


class PendingGrammar:
    """A compile in flight for one request: done when its future is, late after the time limit."""

    def __init__(self, future: Future, param: str, timeout_s: float) -> None:
        self.future = future
        self.param = param
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def result(self) -> Any | None:
        """The compiled grammar, None while still compiling; raises `InvalidRequestError` when the
        constraint is invalid or ran out of time."""
        if not self.future.done():
            if time.monotonic() > self.deadline:
                self.future.cancel()
                raise InvalidRequestError(
                    f"{self.param}: the grammar did not compile within {self.timeout_s:g} s", param=self.param
                )
            return None
        return self.future.result()


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model vocabulary, off the caller's thread, with a cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, num_threads: int = 2) -> None:
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.compile_timeout_s = compile_timeout_s
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                        stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=num_threads, cache_enabled=True)
        self._json_safe = self._tokens_without_control_bytes(vocab_size)
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="pagedserve-grammar")
        self._batch = xgr.BatchGrammarMatcher(max_threads="auto")

    def _tokens_without_control_bytes(self, vocab_size: int) -> torch.Tensor:
        """[ceil(vocab / 32)] int32 bitmask of the tokens whose text holds no byte below 0x20."""
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        for token_id, text in enumerate(self._info.decoded_vocab[:vocab_size]):
            if any(byte < 0x20 for byte in text):
                allowed[token_id] = False
        padded = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)
        padded[:vocab_size] = allowed.long()
        words = (padded.view(-1, 32) << torch.arange(32)).sum(dim=1)
        return words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)

    def submit(self, params: StructuredOutputsParams) -> PendingGrammar:
        return PendingGrammar(self._pool.submit(self._compile, params), params.param, self.compile_timeout_s)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile now, on this thread (tests, offline checks)."""
        return self._compile(params)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        started = time.perf_counter()
        try:
            if params.json is not None:
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                # Standard separators, no free whitespace: a model cannot spend its tokens on blank space.
                compiled = self._compiler.compile_json_schema(schema, any_whitespace=False)
            elif params.json_object:
                # Any JSON object: xgrammar's built-in JSON grammar would take an array at the top level too.
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=True)
            elif params.regex is not None:
                compiled = self._compiler.compile_regex(params.regex)
            elif params.choice is not None:
                compiled = self._compiler.compile_grammar(choice_grammar(params.choice))
            else:
                compiled = self._compiler.compile_grammar(params.grammar)
        except InvalidRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for a bad constraint
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = _LOG_PREFIX.sub("", message)  # xgrammar's "[time] file.cc:line: " prefix
            raise InvalidRequestError(f"{params.param}: invalid {params.kind}: {message}", param=params.param) from None
        logger.debug("compiled a %s grammar in %.1f ms", params.kind, (time.perf_counter() - started) * 1e3)
        return CompiledConstraint(compiled, self._json_safe if params.is_json else None)

    def matcher(self, compiled: "CompiledConstraint") -> "SequenceGrammar":
        return SequenceGrammar(_xgrammar().GrammarMatcher(compiled.grammar), compiled.extra_mask, self._batch)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return _xgrammar().allocate_token_bitmask(num_rows, vocab_size)


def fill_bitmask(matchers: list[SequenceGrammar], rows: list[int], num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab / 32)] int32 bitmask on the host: row rows[i] holds the tokens matcher i allows,
    every other row allows everything."""
    bitmask = allocate_bitmask(num_rows, vocab_size)  # all ones
    if not matchers:
        return bitmask
    # One call for every row, on the batch matcher's threads (they release the GIL).
    matchers[0].batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], bitmask, indices=rows)
    for row, matcher in zip(rows, matchers):
        if matcher.extra_mask is not None:
            bitmask[row] &= matcher.extra_mask
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of tokens the bitmask forbids to -inf, in place, in the given rows only."""
    if logits.device.type == "cuda":  # from pinned memory: a pageable copy would wait for the queued forward
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask, indices=rows)
