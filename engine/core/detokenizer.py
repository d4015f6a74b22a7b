"""Incremental detokenization of one completion, with stop strings.

`IncrementalDetokenizer` owns the text of one completion: it turns generated token ids into text as they
arrive, doing work bounded by the size of the current character/word window (never by the length of the
sequence), and finds stop strings across token boundaries. It composes two small parts:

- a decode stream (`_FastDecodeStream` over `tokenizers.decoders.DecodeStream` for fast tokenizers, or
  `_WindowDecodeStream`, the prefix/read-offset method, for anything else with a `decode`), which returns
  only whole characters: a token that ends in the middle of a multi-byte UTF-8 character yields "" until
  the character completes;
- `_StopStringMatcher`, which holds back text that could still be the start of a stop string.

Both streams are primed with a short tail of the prompt, so a first output token whose text depends on
its left neighbour (SentencePiece's "▁Hello" -> " Hello") decodes as it would inside the full sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.engine.core.request import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt tails tried as decode context: long enough for any left-context effect of a decoder, short
# enough that priming costs nothing next to the prompt's prefill.
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


def _prompt_context(prompt_token_ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The shortest prompt tail (at least 4 tokens) that decodes to whole characters.

    A tail cut in the middle of a multi-byte character would decode to a replacement character and spoil
    the prefix that output text is measured against; a longer tail starts on a character boundary.
    """
    if len(prompt_token_ids) <= _MIN_CONTEXT_TOKENS:
        return list(prompt_token_ids)
    longest = min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS)
    for length in range(_MIN_CONTEXT_TOKENS, longest + 1):
        tail = prompt_token_ids[-length:]
        if REPLACEMENT_CHAR not in decode(tail):
            return tail
    return prompt_token_ids[-longest:]


def _backend_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for attribute in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attribute, None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


class _FastDecodeStream:
    """`tokenizers.decoders.DecodeStream`, plus the lossy tail at finish that DecodeStream never returns."""

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = self._new_stream(context_ids)
        # Ids of the last emitted chunk (decode context for `flush`) and ids not yet turned into text.
        self._last_chunk_ids: list[int] = list(context_ids)
        self._pending_ids: list[int] = []

    def _new_stream(self, context_ids: list[int]) -> DecodeStream:
        stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        if context_ids:
            # Priming returns the context's own text, which is not ours to emit.
            self._step_many(stream, context_ids)
        return stream

    def _step_many(self, stream: DecodeStream, token_ids: list[int]) -> str | None:
        try:
            return stream.step(self._tokenizer, token_ids)
        except TypeError:  # tokenizers < 0.22 steps one id at a time
            pieces = [stream.step(self._tokenizer, token_id) for token_id in token_ids]
            texts = [piece for piece in pieces if piece is not None]
            return "".join(texts) if texts else None

    def step(self, token_id: int) -> str:
        self._pending_ids.append(token_id)
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception as error:
            # DecodeStream refuses a window whose text no longer starts with its previous text (a
            # decoder that rewrites its left context). Restart from the window we track ourselves.
            if "prefix" not in str(error).lower():
                raise
            text = self._restart()
        if text is None:
            return ""
        self._last_chunk_ids = self._pending_ids
        self._pending_ids = []
        return text

    def _restart(self) -> str | None:
        # Emitted text cannot be taken back, so the stream goes on as if the ids pending now came after
        # the last chunk; ByteFallback decoders that turn an already emitted byte into U+FFFD once an
        # invalid byte joins its group can only get this wrong, and only for such invalid sequences.
        for context_ids in (self._last_chunk_ids, []):
            self._stream = self._new_stream(context_ids)
            try:
                return self._step_many(self._stream, self._pending_ids)
            except Exception as error:
                if "prefix" not in str(error).lower():
                    raise
        raise AssertionError("a stream without context has no prefix to violate")

    def flush(self) -> str:
        """Text of the tokens still held (an unfinished or invalid UTF-8 tail), with replacement chars."""
        if not self._pending_ids:
            return ""
        context_ids, pending_ids = self._last_chunk_ids, self._pending_ids
        self._last_chunk_ids, self._pending_ids = context_ids + pending_ids, []
        prefix_text = self._decode(context_ids)
        full_text = self._decode(context_ids + pending_ids)
        if full_text.startswith(prefix_text):
            return full_text[len(prefix_text):]
        return self._decode(pending_ids)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


class _WindowDecodeStream:
    """The prefix/read-offset method for tokenizers without a Rust backend.

    The window holds the ids of the last emitted chunk (whose text is `_prefix_text`) followed by ids not yet
    emitted; each step decodes only this window and emits what its text adds to the prefix text, unless it
    ends in a replacement character (a multi-byte character still incomplete).
    """

    def __init__(self, decode: Callable[[list[int]], str], context_ids: list[int]) -> None:
        self._decode = decode
        self._window_ids: list[int] = list(context_ids)
        self._num_prefix_ids = len(context_ids)
        self._prefix_text = decode(self._window_ids) if context_ids else ""

    def step(self, token_id: int) -> str:
        self._window_ids.append(token_id)
        window_text = self._decode(self._window_ids)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        new_text = window_text[len(self._prefix_text):]
        # The tokens just emitted become the next prefix; older ones are never needed again.
        self._window_ids = self._window_ids[self._num_prefix_ids:]
        self._num_prefix_ids = len(self._window_ids)
        self._prefix_text = self._decode(self._window_ids)
        return new_text

    def flush(self) -> str:
        if len(self._window_ids) == self._num_prefix_ids:
            return ""
        window_text = self._decode(self._window_ids)
        self._num_prefix_ids = len(self._window_ids)
        new_text = window_text[len(self._prefix_text):]
        self._prefix_text = window_text
        return new_text


class _StopStringMatcher:
    """Finds stop strings in a stream of text pieces and holds back text that may begin one.

    The match reported is the one that ends first in the text (ties: the longest, i.e. the one starting
    first), which is what a streaming engine can know without waiting for more tokens; it does not depend
    on how the text was cut into pieces.
    """

    def __init__(self, stop_strings: list[str], include_stop_str_in_output: bool) -> None:
        self._stop_strings = list(stop_strings)
        self._include_stop_str = include_stop_str_in_output
        self._max_stop_len = max((len(stop) for stop in self._stop_strings), default=0)
        self._stop_prefixes = {stop[:length] for stop in self._stop_strings for length in range(1, len(stop))}
        # Last (longest stop - 1) chars seen: a stop string ending in new text starts at most this far back.
        self._recent_text = ""
        self._held_text = ""  # a suffix of `_recent_text` not emitted yet
        self.matched_stop: str | None = None

    def feed(self, text: str, matching: bool = True) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string matched in this piece or None). With `matching` false (the
        completion is under its min_tokens) no stop string ends it, but text that may begin one is still held
        back: a stop string that ends in a later piece is found whole."""
        if self.matched_stop is not None:
            raise RuntimeError(f"text fed after stop string {self.matched_stop!r} matched")
        if not self._stop_strings or not text:
            return text, None
        buffer = self._recent_text + text
        emit_from = len(self._recent_text) - len(self._held_text)
        match = self._first_match(buffer, len(self._recent_text)) if matching else None
        if match is not None:
            start, stop = match
            cut = start + len(stop) if self._include_stop_str else start
            self.matched_stop = stop
            self._held_text = ""
            return buffer[emit_from:max(cut, emit_from)], stop
        num_held = 0 if self._include_stop_str else self._longest_stop_prefix_suffix(buffer)
        emit_to = len(buffer) - num_held
        self._held_text = buffer[emit_to:]
        self._recent_text = buffer[max(0, len(buffer) - (self._max_stop_len - 1)):]
        return buffer[emit_from:emit_to], None

    def flush(self) -> str:
        """At finish: the held-back text, which can no longer become a stop string."""
        held, self._held_text = self._held_text, ""
        return held

    def _first_match(self, buffer: str, new_from: int) -> tuple[int, str] | None:
        """The first stop string to end in `buffer[new_from:]` (one lying wholly in the text before either matched
        then, or was fed while matching was off: under min_tokens)."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stop_strings:
            start = buffer.find(stop, max(0, new_from - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        for length in range(min(self._max_stop_len - 1, len(buffer)), 0, -1):
            if buffer[len(buffer) - length:] in self._stop_prefixes:
                return length
        return 0


class IncrementalDetokenizer:
    """Text of one completion, built one generated token at a time.

    `append` returns only text that is final: whole characters, no text that could still start a stop
    string, and never a matched stop string (unless `include_stop_str_in_output`) or anything after it.
    Once a stop string has matched, the completion is over and `append` raises.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        skip_special_tokens = params.skip_special_tokens
        backend = _backend_tokenizer(tokenizer)
        self._stream: _FastDecodeStream | _WindowDecodeStream
        if backend is not None:
            def decode_fast(ids: list[int]) -> str:
                return backend.decode(ids, skip_special_tokens=skip_special_tokens)

            context_ids = _prompt_context(prompt_token_ids, decode_fast)
            self._stream = _FastDecodeStream(backend, context_ids, skip_special_tokens)
        else:
            def decode_slow(ids: list[int]) -> str:
                return tokenizer.decode(
                    ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
                )

            context_ids = _prompt_context(prompt_token_ids, decode_slow)
            self._stream = _WindowDecodeStream(decode_slow, context_ids)
        self._matcher = _StopStringMatcher(params.stop or [], params.include_stop_str_in_output)
        self._chunks: list[str] = []
        self._joined_text = ""
        self._num_joined_chunks = 0
        self._is_flushed = False

    def append(self, token_id: int, check_stop: bool = True) -> tuple[str, str | None]:
        """Feed one generated token; returns (new text safe to emit, matched stop string or None). `check_stop`
        false: no stop string may end the completion at this token (it is within min_tokens); one that ends at a
        later token is found whole, as vLLM finds it."""
        if self._is_flushed:
            raise RuntimeError("append after flush: the completion is already finished")
        if self._matcher.matched_stop is not None:
            raise RuntimeError(f"append after stop string {self._matcher.matched_stop!r} matched")
        text, stop = self._matcher.feed(self._stream.step(token_id), check_stop)
        self._emit(text)
        return text, stop

    def flush(self, check_stop: bool = True) -> str:
        """At finish without a stop string: the held-back text (and any incomplete character, as U+FFFD).
        `check_stop`: as for the last `append`."""
        if self._is_flushed or self._matcher.matched_stop is not None:
            return ""
        self._is_flushed = True
        # The undecodable tail can still complete a stop string; then the text ends before it.
        text, stop = self._matcher.feed(self._stream.flush(), check_stop)
        if stop is None:
            text += self._matcher.flush()
        self._emit(text)
        return text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the completion, if one did."""
        return self._matcher.matched_stop

    @property
    def output_text(self) -> str:
        """Everything emitted so far (joined lazily, so a step costs nothing proportional to the text)."""
        if self._num_joined_chunks < len(self._chunks):
            self._joined_text += "".join(self._chunks[self._num_joined_chunks:])
            self._num_joined_chunks = len(self._chunks)
        return self._joined_text

    def _emit(self, text: str) -> None:
        if text:
            self._chunks.append(text)
