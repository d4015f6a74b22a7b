"""serve_app/chunk_format.py: each event is the bytes the chunk's pydantic model gives, for the texts a
tokenizer can produce (quotes, backslashes, control characters, non-ASCII) and every finish and stop reason."""

from __future__ import annotations

import json

import pytest

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.chunk_format import ChunkFormat

TEXTS = ["", " hello", 'say "hi"\\n', "a\x00\x1f\x7f\n\t\r\b\f", "é\u2028😀 中文", "</script>/"]
ENDS = [(None, None), ("stop", None), ("stop", 13), ("stop", "\n\nUser:"), ("length", None), ("error", None)]
MODELS = ["/tmp/model", 'a "quoted" model', '"choices":[]']


def sse(chunk: oai.BaseModel) -> bytes:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n".encode()


@pytest.mark.parametrize("model", MODELS)
def test_completion_text_events_are_the_models_bytes(model: str) -> None:
    chunks = ChunkFormat(oai.CompletionChunk, "cmpl-1", 1733300000, model)
    for index, text in enumerate(TEXTS):
        for finish_reason, stop_reason in ENDS:
            expected = sse(oai.CompletionChunk(id="cmpl-1", created=1733300000, model=model, choices=[
                oai.CompletionChoice(index=index, text=text, finish_reason=finish_reason, stop_reason=stop_reason)]))
            assert chunks.text(index, text, finish_reason, stop_reason) == expected


@pytest.mark.parametrize("model", MODELS)
def test_chat_content_events_are_the_models_bytes(model: str) -> None:
    chunks = ChunkFormat(oai.ChatCompletionChunk, "chatcmpl-1", 7, model)
    for index, text in enumerate(TEXTS):
        for finish_reason, _ in ENDS:
            expected = sse(oai.ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[
                oai.ChatChunkChoice(index=index, delta=oai.ChatDelta(content=text), finish_reason=finish_reason)]))
            assert chunks.content(index, text, finish_reason) == expected


def test_model_choices_and_usage_share_the_envelope() -> None:
    chunks = ChunkFormat(oai.ChatCompletionChunk, "chatcmpl-2", 7, "m")
    role = oai.ChatChunkChoice(index=1, delta=oai.ChatDelta(role="assistant", content=""))
    assert chunks.choice(role) == sse(oai.ChatCompletionChunk(id="chatcmpl-2", created=7, model="m", choices=[role]))
    usage = oai.UsageInfo(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    event = chunks.usage(usage)
    assert event == sse(oai.ChatCompletionChunk(id="chatcmpl-2", created=7, model="m", choices=[], usage=usage))
    assert json.loads(event[len(b"data: "):])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
