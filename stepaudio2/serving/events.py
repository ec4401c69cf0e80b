"""Wire form of pipeline events: one JSON object per streamed response."""

from __future__ import annotations

from collections.abc import Callable
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


class EventCoalescer:
    """Merges consecutive `text` events (same `in_speech`) and consecutive `audio_codes` events until flush().

    The pipeline flushes at the end of each llm response, so a stream that keeps up still gets one event per
    token, and one that falls behind (the llm packs several tokens into a response) gets fewer, larger events:
    the per-event cost (JSON, gRPC response) is paid per response, not per token, like vLLM's stream interval.
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._pending: dict[str, Any] | None = None

    def add(self, payload: dict[str, Any]) -> None:
        p = self._pending
        if p is not None and p["type"] == payload["type"] == "text" and p["in_speech"] == payload["in_speech"]:
            p["text"] += payload["text"]
        elif p is not None and p["type"] == payload["type"] == "audio_codes":
            p["codes"].extend(payload["codes"])
        else:
            self.flush()
            self._pending = dict(payload)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._emit(pending)
