"""Tool calls in chat responses: whole (`tool_call_models`) and streamed (`ToolCallStream`), as OpenAI shapes them."""

from __future__ import annotations

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.tool_calls import ToolCall, ToolPlan


def tool_call_models(calls: list[ToolCall]) -> list[oai.ToolCallModel]:
    return [oai.ToolCallModel(id=call.id, function=oai.ToolCallFunction(name=call.name, arguments=call.arguments))
            for call in calls]


class ToolCallStream:
    """One streamed chat choice under tools: deltas as OpenAI sends them.

    A named function streams its arguments as they come (the first delta names the call). `required`, and
    `auto` once the text starts like a tool call, hold the text back and send the calls whole when the
    completion ends (as content if it did not parse). Other text streams as content.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.started = False
        self.is_content = False  # auto mode: set once the text cannot be the start of a tool call

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
        deltas = [oai.DeltaToolCall(index=i, id=call.id, type="function",
                                    function=oai.DeltaFunction(name=call.name, arguments=call.arguments))
                  for i, call in enumerate(calls)]
        return oai.ChatDelta(content=content, tool_calls=deltas), "tool_calls" if finish_reason == "stop" else finish_reason

