"""Wire form of pipeline events: one JSON object per streamed response."""

from __future__ import annotations

from typing import Any

from stepaudio2.text import AudioCodes, ReasoningDelta, TextDelta, ToolCallEvent


def event_dict(event: Any) -> dict[str, Any] | None:
    """A demultiplexer event as a JSON-able dict, or None for events the client does not need."""
    if isinstance(event, TextDelta):
        return {"type": "text", "text": event.text, "in_speech": event.in_speech} if event.text else None
    if isinstance(event, AudioCodes):
        return {"type": "audio_codes", "codes": list(event.codes)}
    if isinstance(event, ToolCallEvent):
        return {"type": "tool_call", "call": event.call.to_dict()}
    if isinstance(event, ReasoningDelta):  # think mode: streamed apart from the answer, never spoken
        return {"type": "reasoning", "text": event.text} if event.text else None
    return None
