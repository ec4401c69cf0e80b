"""Named voices: the bundled default, and voices registered from a reference wav (an extension endpoint).

The gateway keeps the wav and sends it with each request (the server caches its prompt features by content
hash), so a voice works on any Triton replica behind the Service."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_VOICE = "default"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Voice:
    name: str
    wav: bytes | None  # None: the server's bundled voice
    voice_id: str | None
    created: int


class VoiceRegistry:
    def __init__(self, max_voices: int = 64) -> None:
        self.max_voices = max_voices
        self._voices: OrderedDict[str, Voice] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name == DEFAULT_VOICE or name in self._voices

    def get(self, name: str) -> Voice:
        if name == DEFAULT_VOICE:
            return Voice(DEFAULT_VOICE, None, None, 0)
        self._voices.move_to_end(name)
        return self._voices[name]

    def add(self, name: str, wav: bytes, voice_id: str) -> Voice:
        voice = Voice(name, wav, voice_id, int(time.time()))
        self._voices[name] = voice
        self._voices.move_to_end(name)
        while len(self._voices) > self.max_voices:
            self._voices.popitem(last=False)
        return voice

    def remove(self, name: str) -> bool:
        return self._voices.pop(name, None) is not None

    def names(self) -> list[str]:
        return [DEFAULT_VOICE, *self._voices]


class ReplayCache:
    """Spoken replies by `message.audio.id`, so a client can send `{"role": "assistant", "audio": {"id"}}` back
    (OpenAI's multi-turn audio) and the model sees its exact earlier turn (text and speech codes)."""

    def __init__(self, max_items: int = 1024, ttl_s: float = 3600.0) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def put(self, key: str, turn: dict) -> int:
        expires = time.time() + self.ttl_s
        self._items[key] = (expires, turn)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return int(expires)

    def get(self, key: str) -> dict | None:
        item = self._items.get(key)
        if item is None or item[0] < time.time():
            return None
        return item[1]
