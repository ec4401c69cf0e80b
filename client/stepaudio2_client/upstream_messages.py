"""Conversations in upstream's message format (Step-Audio2's examples) -> the `pipeline` request's messages.

Upstream: roles `system`, `human` (or `user`), `assistant`, `input`; content a string, None, or a list of
{"type": "text", "text"}, {"type": "audio", "audio": "path.wav"} and {"type": "token", "token": [ids]} items
(a spoken assistant turn is [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": ids}]). The last
message is the assistant opener: content None (text reply) or "<tts_start>" with "eot": false (spoken reply).
Audio items become {"type": "audio", "index": k} placeholders for the k-th clip of the request; token items
become token_ids items. Relative audio paths are read relative to the file's folder.

Torch-free, so `stepaudio2-client --messages` uses it as `stepaudio2 generate --messages` does; each side loads
the clips its own way (`load_clip`: wav bytes for the wire, decoded audio in-process).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROLES = ("system", "human", "user", "assistant", "input", "tool_json_schemas")
TTS_START = "<tts_start>"

Clip = TypeVar("Clip")


class MessagesError(ValueError):
    """The message list is not in upstream's format (names the message and item)."""


def _opener(msg: Any) -> str | None:
    """'text' / 'speech' when `msg` is upstream's assistant opener, else None."""
    if not isinstance(msg, dict) or msg.get("role") != "assistant":
        return None
    if msg.get("content") is None:
        return "text"
    if msg.get("content") == TTS_START and msg.get("eot", True) is False:
        return "speech"
    return None


def convert_messages(messages: Any, load_clip: Callable[[Path], Clip], base_dir: Path | None = None
                     ) -> tuple[list[dict], str, list[Clip]]:
    """(our messages, generation "text"/"speech", the clips in index order) for an upstream message list."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError("messages must be a non-empty list of {'role', 'content'} objects")
    generation = _opener(messages[-1])
    if generation is None:
        raise MessagesError("the last message must be the assistant opener: content null (text reply) or "
                            "\"<tts_start>\" with \"eot\": false (spoken reply)")
    clips: list[Clip] = []
    out = []
    for n, msg in enumerate(messages[:-1]):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise MessagesError(f"message #{n}: role must be one of {', '.join(ROLES)}")
        if msg.get("eot", True) is False:
            raise MessagesError(f"message #{n}: only the last (assistant opener) message may have eot false")
        content = msg.get("content")
        if isinstance(content, list):
            items = []
            for k, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "audio":
                    path = item.get("audio")
                    if not isinstance(path, str) or not path:
                        raise MessagesError(f"message #{n} item #{k}: an audio item needs an 'audio' file path")
                    p = Path(path)
                    p = p if p.is_absolute() or base_dir is None else base_dir / p
                    if not p.is_file():
                        raise MessagesError(f"message #{n} item #{k}: audio file {p} does not exist")
                    clips.append(load_clip(p))
                    items.append({"type": "audio", "index": len(clips) - 1})
                elif kind == "token":
                    items.append({"type": "token_ids", "ids": item.get("token")})
                else:
                    items.append(item)
            content = items
        out.append({**{k: v for k, v in msg.items() if k != "eot"}, "content": content})
    return out, generation, clips


def read_messages_file(path: str | Path) -> tuple[list[Any], Path]:
    """The JSON message list of a `--messages` file and the folder its relative audio paths start from."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8")), p.parent
    except (OSError, json.JSONDecodeError) as exc:
        raise MessagesError(f"--messages {p}: cannot read a JSON message list: {exc}") from exc


def with_tool_schemas(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with a tool_json_schemas turn where upstream's vLLM template places it: after the system
    turn (a message list carries its tools as a turn, not as the request's `tools` field)."""
    if not tools:
        return messages
    at = 1 if messages and messages[0].get("role") == "system" else 0
    return [*messages[:at], {"role": "tool_json_schemas", "content": tools}, *messages[at:]]
