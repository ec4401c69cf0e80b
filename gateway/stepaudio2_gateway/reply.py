"""Pipeline events -> the pieces of an OpenAI chat reply (text, transcript, audio, tool calls), with `stop`
strings applied by the gateway (the server stops on token ids only): text is held back by up to the longest stop
string minus one character, so a stop string split across deltas is still caught before it is sent."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from stepaudio2_gateway.audio import pcm16


@dataclass
class Piece:
    kind: str  # "content" | "transcript" | "audio" | "tool_call"
    text: str = ""
    pcm: bytes = b""
    call: dict | None = None


@dataclass
class Outcome:
    finish_reason: str = "stop"
    result: dict | None = None  # the pipeline's result event (None when a stop string ended the reply)
    stopped: bool = False


class _StopText:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """New text to send, and whether a stop string was reached (then nothing after it is sent)."""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.sent = self.text[self.sent : min(hits)], len(self.text)
            return out, True
        upto = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def tool_call_object(call: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments") or {}, ensure_ascii=False)}}


async def pieces(events: AsyncIterator[dict], stops: list[str], outcome: Outcome) -> AsyncIterator[Piece]:
    """Reply pieces in arrival order; `outcome` is filled in at the end. Returning early closes `events`."""
    filters = {"content": _StopText(stops), "transcript": _StopText(stops)}
    calls = 0
    async with contextlib.aclosing(events):  # a stop string ends the reply early: close (cancel) the stream now
        async for event in events:
            kind = event.get("type")
            if kind == "text":
                which = "transcript" if event.get("in_speech") else "content"
                text, hit = filters[which].feed(event["text"])
                if text:
                    yield Piece(which, text=text)
                if hit:
                    outcome.stopped = True
                    outcome.finish_reason = "stop"
                    return
            elif kind == "audio":
                yield Piece("audio", pcm=pcm16(event["pcm"]))
            elif kind == "tool_call":
                calls += 1
                yield Piece("tool_call", call=tool_call_object(event["call"]))
            elif kind == "result":
                for which, f in filters.items():
                    if rest := f.flush():
                        yield Piece(which, text=rest)
                outcome.result = event
                outcome.finish_reason = "tool_calls" if calls else event.get("finish_reason", "stop")
                return


def usage(result: dict[str, Any] | None) -> dict | None:
    if result is None or "usage" not in result:
        return None
    u = result["usage"]
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
