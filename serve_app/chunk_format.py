"""The bytes of one streamed response's server-sent events, without a pydantic model per event.

A stream's chunks differ only in their one choice: the envelope (id, object, created, model) is rendered once
per response by the chunk's own model (`openai_protocol`) and split around `"choices":[...]`. The common
choices (a completion's text; a chat delta's content) are written with `json.dumps` of their few values, in
the field order and with the escapes of the model's `model_dump_json(exclude_none=True)`, so an event is the
same bytes either way (tests/serve_app/test_chunk_format.py). Choices that carry more (logprobs, tool calls,
the role) are pydantic models, dumped and placed in the same envelope.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from pagedserve.serve_app import openai_protocol as oai

_CHOICES = '"choices":[]'
_END = b"]}\n\n"


def _json(value: object) -> str:
    # pydantic writes non-ASCII as UTF-8, not \u escapes; the control characters as json does.
    return json.dumps(value, ensure_ascii=False)


def _tail(name: str, value: object) -> str:
    return "" if value is None else f',"{name}":{_json(value)}'


class ChunkFormat:
    """Events of one response whose chunks are `chunk_cls` (`CompletionChunk` or `ChatCompletionChunk`)."""

    def __init__(self, chunk_cls: type[BaseModel], request_id: str, created: int, model: str) -> None:
        self.chunk_cls = chunk_cls
        self.request_id, self.created, self.model = request_id, created, model
        envelope = chunk_cls(id=request_id, created=created, model=model, choices=[]).model_dump_json(exclude_none=True)
        # `choices` is the last field dumped (usage is None): a model name holding those characters is escaped.
        head, found, rest = envelope.rpartition(_CHOICES)
        if not found or rest != "}":
            raise ValueError(f"{chunk_cls.__name__} does not end with its choices: {envelope!r}")
        self._head = f"data: {head}\"choices\":[".encode()

    def choice(self, choice: BaseModel) -> bytes:
        """The event of one choice model (`CompletionChoice` or `ChatChunkChoice`)."""
        return self._head + choice.model_dump_json(exclude_none=True).encode() + _END

    def text(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> bytes:
        """A completions choice without logprobs."""
        rendered = (f'{{"index":{index},"text":{_json(text)}{_tail("finish_reason", finish_reason)}'
                    f'{_tail("stop_reason", stop_reason)}}}')
        return self._head + rendered.encode() + _END

    def content(self, index: int, content: str, finish_reason: str | None) -> bytes:
        """A chat choice whose delta is content only, without logprobs."""
        rendered = f'{{"index":{index},"delta":{{"content":{_json(content)}}}{_tail("finish_reason", finish_reason)}}}'
        return self._head + rendered.encode() + _END

    def usage(self, usage: oai.UsageInfo) -> bytes:
        """The last chunk of `stream_options.include_usage`: no choices, the usage."""
        chunk = self.chunk_cls(id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n".encode()
