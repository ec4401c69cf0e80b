"""`stepaudio2 generate --messages`: upstream's message format (see stepaudio2_client.upstream_messages, shared
with `stepaudio2-client --messages`) with the clips decoded in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepaudio2.errors import InvalidInputError
from stepaudio2.request import AudioInput
from stepaudio2_client import upstream_messages as upstream


def convert_messages(messages: Any, base_dir: Path | None = None) -> tuple[list[dict], str, list[AudioInput]]:
    """(our messages, generation, audio clips) for an upstream message list."""
    from stepaudio2.pipeline import load_audio_input

    try:
        return upstream.convert_messages(messages, load_audio_input, base_dir)
    except upstream.MessagesError as exc:
        raise InvalidInputError(str(exc)) from exc


def load_messages_file(path: str | Path) -> tuple[list[dict], str, list[AudioInput]]:
    try:
        data, base_dir = upstream.read_messages_file(path)
    except upstream.MessagesError as exc:
        raise InvalidInputError(str(exc)) from exc
    return convert_messages(data, base_dir)
