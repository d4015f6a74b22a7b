"""IncrementalDetokenizer: streamed text equals a full decode; stop strings cut the text exactly.

Tokenizers are trained here on a few sentences (no downloads): a GPT-2-style byte-level BPE and a
Llama-style one (Metaspace pre-tokenizer, byte-fallback tokens, decoder that strips the leading space).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagedserve.engine.core.detokenizer import IncrementalDetokenizer
from pagedserve.engine.core.request import SamplingParams
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog! Stop here.",
    "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 😀🎉 and more.",
    "def main():\n    return 42  # the answer\n",
    "STOP, stop, Stop; the end. END of line.\n\nNew paragraph.",
] * 4
UNICODE_TEXT = "naïve café — 日本語 😀🎉 über Straße"
# Words and characters of CORPUS (so stops do match), parts of multi-byte characters, and a miss.
STOP_CANDIDATES = ["stop", "STOP", "Stop;", "e", " the", "ö", "日本", "😀", ".\n\n", "o w", "zzz", "é"]
HYPOTHESIS_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def _llama_style_tokenizer() -> PreTrainedTokenizerFast:
    special_tokens = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=special_tokens))
    # As in Llama, the 256 byte tokens are ordinary vocabulary (ids 3..258), not special tokens: a trainer
    # would mark them special and decode(skip_special_tokens=True) would drop them.
    config = json.loads(backend.to_str())
    trained_tokens = sorted(config["model"]["vocab"], key=config["model"]["vocab"].get)
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    ordered = special_tokens + byte_tokens + [token for token in trained_tokens if token not in special_tokens]
    config["model"]["vocab"] = {token: index for index, token in enumerate(ordered)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(config)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class _SlowOnlyTokenizer:
    """Exposes only `decode`, so the detokenizer must take its prefix/read-offset path."""

    def __init__(self, fast: PreTrainedTokenizerFast) -> None:
        self._fast = fast

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    byte_level = _byte_level_tokenizer()
    llama_style = _llama_style_tokenizer()
    return {
        "byte_level": byte_level,
        "llama_style": llama_style,
        "byte_level_slow": _SlowOnlyTokenizer(byte_level),
        "llama_style_slow": _SlowOnlyTokenizer(llama_style),
    }


TOKENIZER_NAMES = ["byte_level", "llama_style", "byte_level_slow", "llama_style_slow"]


def _fast_of(tokenizer: Any) -> PreTrainedTokenizerFast:
    return tokenizer._fast if isinstance(tokenizer, _SlowOnlyTokenizer) else tokenizer


def _stream(tokenizer: Any, prompt_ids: list[int], ids: list[int], params: SamplingParams) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    chunks = [detokenizer.append(token_id)[0] for token_id in ids]
    tail = detokenizer.flush()
    assert detokenizer.output_text == "".join(chunks) + tail
    return chunks, tail


def _first_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """Reference: the stop string occurrence that ends first (ties: the longest); (start, end, stop)."""
    found = [(text.find(stop) + len(stop), -len(stop), stop) for stop in stops if stop in text]
    if not found:
        return None
    end, negative_length, stop = min(found)
    return end + negative_length, end, stop


def _random_ids(fast: PreTrainedTokenizerFast, max_size: int) -> st.SearchStrategy[list[int]]:
    """Random ids; for byte-fallback vocabularies, byte tokens only in runs that spell whole characters.

    ByteFallback decodes a run of byte tokens as one unit and, if the run is invalid UTF-8, turns every
    byte of it into U+FFFD, including bytes that already decoded to a character (b"A" + b"\x80" gives
    two U+FFFD). No stream can emit "A" and later take it back, so such runs are left out here; a
    model that writes them gets text that differs from a full decode only inside the invalid run.
    """
    byte_tokens = {token: index for token, index in fast.get_vocab().items() if token.startswith("<0x")}
    if not byte_tokens:
        return st.lists(st.integers(0, len(fast) - 1), max_size=max_size)
    other_ids = sorted(set(range(len(fast))) - set(byte_tokens.values()))
    character_ids = st.characters(codec="utf-8").map(
        lambda char: [byte_tokens[f"<0x{byte:02X}>"] for byte in char.encode()]
    )
    single_ids = st.sampled_from(other_ids).map(lambda index: [index])
    pieces = st.lists(st.one_of(single_ids, character_ids), max_size=max_size)
    return pieces.map(lambda groups: [index for group in groups for index in group])


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_stream_equals_full_decode(
    tokenizers: dict[str, Any], name: str, skip_special_tokens: bool
) -> None:
    tokenizer = tokenizers[name]
    fast = _fast_of(tokenizer)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)

    @HYPOTHESIS_SETTINGS
    @given(_random_ids(fast, max_size=60))
    def check(ids: list[int]) -> None:
        chunks, tail = _stream(tokenizer, [], ids, params)
        assert "".join(chunks) + tail == fast.decode(ids, skip_special_tokens=skip_special_tokens)

    check()


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_output_after_prompt_decodes_in_context(tokenizers: dict[str, Any], name: str) -> None:
    """A first token like '▁Hello' keeps its space after a prompt: text = decode(prompt + out) - decode(prompt)."""
    tokenizer = tokenizers[name]
    fast = _fast_of(tokenizer)
    prompt_ids = fast.encode("The quick brown fox says", add_special_tokens=False)

    @HYPOTHESIS_SETTINGS
    @given(_random_ids(fast, max_size=40))
    def check(ids: list[int]) -> None:
        prompt_text = fast.decode(prompt_ids, skip_special_tokens=True)
        full_text = fast.decode(prompt_ids + ids, skip_special_tokens=True)
        assert full_text.startswith(prompt_text)
        chunks, tail = _stream(tokenizer, prompt_ids, ids, SamplingParams())
        assert "".join(chunks) + tail == full_text[len(prompt_text):]

    check()


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_multibyte_characters_are_never_split(tokenizers: dict[str, Any], name: str) -> None:
    tokenizer = tokenizers[name]
    fast = _fast_of(tokenizer)
    ids = fast.encode(UNICODE_TEXT, add_special_tokens=False)
    chunks, tail = _stream(tokenizer, [], ids, SamplingParams())
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + tail == UNICODE_TEXT
    assert tail == ""


def test_byte_fallback_emoji_waits_for_its_last_byte(tokenizers: dict[str, Any]) -> None:
    fast = tokenizers["llama_style"]
    byte_ids = fast.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in "😀".encode()])
    for tokenizer in (fast, tokenizers["llama_style_slow"]):
        detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
        assert [detokenizer.append(token_id)[0] for token_id in byte_ids] == ["", "", "", "😀"]


def test_incomplete_character_at_finish_is_flushed_lossy(tokenizers: dict[str, Any]) -> None:
    fast = tokenizers["llama_style"]
    byte_ids = fast.convert_tokens_to_ids(["er", "<0xF0>", "<0x9F>"])
    detokenizer = IncrementalDetokenizer(fast, [], SamplingParams())
    assert [detokenizer.append(token_id)[0] for token_id in byte_ids] == ["er", "", ""]
    assert detokenizer.flush() == "\ufffd\ufffd"
    assert detokenizer.output_text == fast.decode(byte_ids)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_cut_at_first_match(tokenizers: dict[str, Any], name: str, include_stop: bool) -> None:
    tokenizer = tokenizers[name]
    fast = _fast_of(tokenizer)
    corpus_ids = fast.encode(" ".join(CORPUS[:5]), add_special_tokens=False)

    @HYPOTHESIS_SETTINGS
    @given(
        start=st.integers(0, len(corpus_ids) - 1),
        length=st.integers(1, 50),
        noise=_random_ids(fast, max_size=4),
        stops=st.lists(
            st.sampled_from(STOP_CANDIDATES),
            min_size=1,
            max_size=3,
            unique=True,
        ),
    )
    def check(start: int, length: int, noise: list[int], stops: list[str]) -> None:
        # Real text, so stop strings do occur, plus random ids that split characters and words.
        ids = noise + corpus_ids[start:start + length]
        params = SamplingParams(stop=stops, include_stop_str_in_output=include_stop)
        full_text = fast.decode(ids, skip_special_tokens=True)
        detokenizer = IncrementalDetokenizer(tokenizer, [], params)
        matched = None
        for token_id in ids:
            _, matched = detokenizer.append(token_id)
            if not include_stop:
                assert not any(stop in detokenizer.output_text for stop in stops)
            if matched is not None:
                break
        if matched is None:
            # The last characters may still be held (an incomplete character or a possible stop
            # string); finishing resolves them, and can still find a stop string in them.
            detokenizer.flush()
        reference = _first_stop(full_text, stops)
        if reference is None:
            assert detokenizer.stop_string is None
            assert detokenizer.output_text == full_text
        else:
            stop_start, stop_end, stop = reference
            assert detokenizer.stop_string == stop
            assert matched in (None, stop)
            assert detokenizer.output_text == full_text[:stop_end if include_stop else stop_start]
            assert detokenizer.flush() == ""

    check()


def test_text_is_held_only_while_it_may_start_a_stop_string(tokenizers: dict[str, Any]) -> None:
    fast = tokenizers["byte_level"]
    detokenizer = IncrementalDetokenizer(fast, [], SamplingParams(stop=["<END>"]))
    pieces = ["Hi", " <", "EN", "x", " <E", "ND", ">", "after"]
    ids = [fast.convert_tokens_to_ids(token) for piece in pieces for token in fast.tokenize(piece)]
    emitted: list[tuple[str, str | None]] = []
    for token_id in ids:
        emitted.append(detokenizer.append(token_id))
        if emitted[-1][1] is not None:
            break
    assert "".join(text for text, _ in emitted) == "Hi <ENx "
    assert emitted[-1][1] == detokenizer.stop_string == "<END>"
    assert detokenizer.output_text == "Hi <ENx "
    with pytest.raises(RuntimeError):
        detokenizer.append(ids[-1])


def test_held_text_is_released_at_flush(tokenizers: dict[str, Any]) -> None:
    fast = tokenizers["byte_level"]
    detokenizer = IncrementalDetokenizer(fast, [], SamplingParams(stop=["world peace"]))
    for token_id in fast.encode("hello world", add_special_tokens=False):
        _, stop = detokenizer.append(token_id)
        assert stop is None
    assert detokenizer.output_text == "hello "
    assert detokenizer.flush() == "world"
    assert detokenizer.output_text == "hello world"


def test_decode_window_stays_bounded(tokenizers: dict[str, Any]) -> None:
    fast = tokenizers["llama_style"]
    ids = fast.encode(" ".join(CORPUS), add_special_tokens=False)
    for tokenizer in (fast, tokenizers["llama_style_slow"]):
        detokenizer = IncrementalDetokenizer(tokenizer, ids[:30], SamplingParams())
        for token_id in ids:
            detokenizer.append(token_id)
        stream = detokenizer._stream
        window = getattr(stream, "_window_ids", None) or stream._last_chunk_ids + stream._pending_ids
        assert len(window) <= 8


def test_byte_fallback_rewriting_emitted_text_does_not_break_the_stream(tokenizers: dict[str, Any]) -> None:
    """b"A" then b"\\x80": ByteFallback now decodes the pair as two U+FFFD, but "A" is already out."""
    fast = tokenizers["llama_style"]
    ids = fast.convert_tokens_to_ids(["<0x41>", "<0x80>", "er"])
    for tokenizer in (fast, tokenizers["llama_style_slow"]):
        detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
        chunks = [detokenizer.append(token_id)[0] for token_id in ids]
        assert chunks[0] == "A" and chunks[-1].endswith("er")
        detokenizer.flush()
        assert detokenizer.output_text.startswith("A") and detokenizer.output_text.endswith("er")


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_split_over_short_pieces_at_the_start(include_stop: bool) -> None:
    from pagedserve.engine.core.detokenizer import _StopStringMatcher

    matcher = _StopStringMatcher(["stop", ".\n\n"], include_stop)
    results = [matcher.feed(piece) for piece in [".", "\n", "\n"]]
    if include_stop:
        assert results == [(".", None), ("\n", None), ("\n", ".\n\n")]
    else:
        assert results == [("", None), ("", None), ("", ".\n\n")]


def test_stop_strings_wait_for_min_tokens() -> None:
    """Under min_tokens (`matching` off) no stop string ends the text, text that may begin one is still held, a
    stop string that ends in a later piece is found whole, and one that lay wholly in the earlier pieces is not
    found again (vLLM's semantics)."""
    from pagedserve.engine.core.detokenizer import _StopStringMatcher

    matcher = _StopStringMatcher(["ab", "x"], include_stop_str_in_output=False)
    assert matcher.feed("x", matching=False) == ("x", None)  # a whole stop string, under min_tokens
    assert matcher.feed("a", matching=False) == ("", None)  # may begin "ab": held
    assert matcher.feed("b", matching=True) == ("", "ab")  # ends now: found whole, the held "a" cut with it
    matcher = _StopStringMatcher(["ab", "x"], include_stop_str_in_output=False)
    assert matcher.feed("zx", matching=False) == ("zx", None)
    assert matcher.feed("y", matching=True) == ("y", None)  # the earlier "x" is not found again
    assert matcher.feed("x", matching=True) == ("", "x")
