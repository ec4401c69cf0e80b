"""Conversations in upstream's message format (Step-Audio2 examples) -> our request.

Upstream: roles `system`, `human` (or `user`), `assistant`, `input`; content a string, None, or a list of
{"type": "text", "text"}, {"type": "audio", "audio": "path.wav"} and {"type": "token", "token": [ids]} items
(a spoken assistant turn is [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": ids}]). The last
message is the assistant opener: content None (text reply) or "<tts_start>" with "eot": false (spoken reply).
Audio items become {"type": "audio", "index": k} placeholders for the k-th clip of the request; token items
become token_ids items. Relative audio paths are read relative to the file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stepaudio2.errors import InvalidInputError
from stepaudio2.request import AudioInput
from stepaudio2.text import tokens as T

ROLES = ("system", "human", "user", "assistant", "input", "tool_json_schemas")


def _opener(msg: Any) -> str | None:
    """'text' / 'speech' when `msg` is upstream's assistant opener, else None."""
    if not isinstance(msg, dict) or msg.get("role") != "assistant":
        return None
    if msg.get("content") is None:
        return "text"
    if msg.get("content") == T.TTS_START and msg.get("eot", True) is False:
        return "speech"
    return None


def convert_messages(
    messages: Any, base_dir: Path | None = None
) -> tuple[list[dict], str, list[AudioInput]]:
    """(our messages, generation, audio clips) for an upstream message list."""
    from stepaudio2.pipeline import load_audio_input

    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} objects")
    generation = _opener(messages[-1])
    if generation is None:
        raise InvalidInputError("the last message must be the assistant opener: content null (text reply) or "
                                "\"<tts_start>\" with \"eot\": false (spoken reply)")
    clips: list[AudioInput] = []
    out = []
    for n, msg in enumerate(messages[:-1]):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise InvalidInputError(f"message #{n}: role must be one of {', '.join(ROLES)}")
        if msg.get("eot", True) is False:
            raise InvalidInputError(f"message #{n}: only the last (assistant opener) message may have eot false")
        content = msg.get("content")
        if isinstance(content, list):
            items = []
            for k, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "audio":
                    path = item.get("audio")
                    if not isinstance(path, str) or not path:
                        raise InvalidInputError(f"message #{n} item #{k}: an audio item needs an 'audio' file path")
                    p = Path(path)
                    p = p if p.is_absolute() or base_dir is None else base_dir / p
                    if not p.is_file():
                        raise InvalidInputError(f"message #{n} item #{k}: audio file {p} does not exist")
                    clips.append(load_audio_input(p))
                    items.append({"type": "audio", "index": len(clips) - 1})
                elif kind == "token":
                    items.append({"type": "token_ids", "ids": item.get("token")})
                else:
                    items.append(item)
            content = items
        out.append({**{k: v for k, v in msg.items() if k != "eot"}, "content": content})
    return out, generation, clips


def load_messages_file(path: str | Path) -> tuple[list[dict], str, list[AudioInput]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--messages {p}: cannot read a JSON message list: {exc}") from exc
    return convert_messages(data, p.parent)
