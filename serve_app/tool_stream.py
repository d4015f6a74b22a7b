"""Tool calls in chat responses: whole (`tool_call_models`) and streamed (`ToolCallStream`), as OpenAI shapes them."""

from __future__ import annotations

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.tool_calls import ToolCall, ToolPlan


def tool_call_models(calls: list[ToolCall]) -> list[oai.ToolCallModel]:
    return [oai.ToolCallModel(id=call.id, function=oai.ToolCallFunction(name=call.name, arguments=call.arguments))
            for call in calls]


# Parsers whose tool calls may follow some content (the text before their marker): an `auto` stream sends that
# content as it comes and holds the text from the marker on (`ToolCallStream._content_then_calls`).
CALLS_AFTER_CONTENT = {"hermes", "mistral"}


class ToolCallStream:
    """One streamed chat choice under tools: deltas as OpenAI sends them.

    A named function streams its arguments as they come (the first delta names the call). `required`, and
    `auto` once the text starts like a tool call, hold the text back and send the calls whole when the
    completion ends (as content if it did not parse). Other text streams as content; with a format whose calls
    may follow content (Hermes, Mistral), up to the call's marker. Joined, the deltas say what the one response
    says (`ToolPlan.read` of the whole text).
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.started = False
        self.is_content = False  # auto mode: set once the text cannot be the start of a tool call
        self.num_sent = 0  # CALLS_AFTER_CONTENT: characters of `held` (all the text) sent as content
        self.marker_at: int | None = None  # CALLS_AFTER_CONTENT: where the marker begins in `held`, once seen

    def feed(self, text: str, finish_reason: str | None) -> tuple[oai.ChatDelta | None, str | None]:
        """(delta to send, finish reason) for new text; (None, None) while holding it back."""
        plan = self.plan
        if plan.mode == "named":
            calls = []
            if not self.started:
                self.started = True
                call = ToolCall(plan.named or "", "").with_id()
                calls.append(oai.DeltaToolCall(index=0, id=call.id, type="function",
                                               function=oai.DeltaFunction(name=call.name, arguments=text)))
            elif text:
                calls.append(oai.DeltaToolCall(index=0, function=oai.DeltaFunction(arguments=text)))
            reason = "tool_calls" if finish_reason == "stop" else finish_reason
            return oai.ChatDelta(tool_calls=calls or None), reason
        if self.is_content:
            return oai.ChatDelta(content=text), finish_reason
        if plan.mode == "auto" and plan.parser in CALLS_AFTER_CONTENT:
            return self._content_then_calls(text, finish_reason)
        self.held += text
        marker = plan.stream_marker or ""
        stripped = self.held.lstrip()
        if plan.mode == "auto" and not (stripped.startswith(marker) or marker.startswith(stripped)):
            self.is_content, held, self.held = True, self.held, ""
            return oai.ChatDelta(content=held), finish_reason
        if finish_reason is None:
            return None, None
        content, calls = plan.read(self.held)
        if not calls:
            return oai.ChatDelta(content=self.held), finish_reason
        return _calls_delta(content, calls, finish_reason)

    def _content_then_calls(self, text: str, finish_reason: str | None) -> tuple[oai.ChatDelta | None, str | None]:
        """`auto` under a format whose calls may follow content: send the text before any marker (less its
        trailing whitespace, and less an end that may begin a marker: the response's content drops both before a
        call), hold the rest; at the end send what the response's content has beyond that, and the calls."""
        marker = self.plan.stream_marker or ""
        searched_from = max(0, len(self.held) - len(marker) + 1)
        self.held += text
        if self.marker_at is None:
            found = self.held.find(marker, searched_from)
            self.marker_at = None if found < 0 else found
        if finish_reason is not None:
            content, calls = self.plan.read(self.held)
            rest = (content or "")[self.num_sent:]
            if not calls:
                return oai.ChatDelta(content=rest), finish_reason
            return _calls_delta(rest or None, calls, finish_reason)
        end = self.marker_at
        if end is None:  # hold back an end of the text that may be the start of the marker
            end = len(self.held) - next((k for k in range(min(len(marker) - 1, len(self.held)), 0, -1)
                                         if marker.startswith(self.held[-k:])), 0)
        ready = self.held[:end].rstrip()
        if len(ready) <= self.num_sent:
            return None, None
        delta, self.num_sent = ready[self.num_sent:], len(ready)
        return oai.ChatDelta(content=delta), None


def _calls_delta(content: str | None, calls: list[ToolCall], finish_reason: str) -> tuple[oai.ChatDelta, str]:
    """The last delta of a choice whose text held tool calls: the content left, every call whole, and the finish
    reason as OpenAI gives it ("tool_calls" for a natural stop)."""
    deltas = [oai.DeltaToolCall(index=i, id=call.id, type="function",
                                function=oai.DeltaFunction(name=call.name, arguments=call.arguments))
              for i, call in enumerate(calls)]
    return oai.ChatDelta(content=content, tool_calls=deltas), "tool_calls" if finish_reason == "stop" else finish_reason
