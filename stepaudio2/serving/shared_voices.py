"""Voices shared through the state store: a voice registered on one replica is usable by `voice_id` on any other.

The voice_prompt model keeps prompts in its own process (an LRU); behind a load balancer the next request may
reach a replica that never saw the audio. So the pipeline writes each new prompt's features to the store under
its voice_id (the content hash) and looks a voice_id up there first. The store is a cache in front of
voice_prompt: when it is down, voices still work where the voice_prompt model knows them.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from stepaudio2.errors import UnavailableError
from stepaudio2.serving.session_store import StateStore

log = logging.getLogger(__name__)
_ARRAYS = ("prompt_tokens", "prompt_mel", "prompt_xvector")


def encode_prompt(prompt: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(prompt[name]) for name in _ARRAYS})
    return buf.getvalue()


def decode_prompt(voice_id: str, data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        prompt = {name: z[name].copy() for name in _ARRAYS}
    prompt["voice_id"] = np.array([voice_id.encode()], dtype=np.object_)
    return prompt


def _voice_id(prompt: dict[str, np.ndarray]) -> str:
    return bytes(np.asarray(prompt["voice_id"]).reshape(-1)[0]).decode()


class SharedVoiceStages:
    """Wraps the stages: `voice` goes through the store; every other call passes through unchanged."""

    def __init__(self, stages: Any, store: StateStore) -> None:
        self.stages = stages
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stages, name)

    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]:
        if audio is None and voice_id:
            try:
                data = self.store.get_voice(voice_id)
            except UnavailableError as exc:
                log.warning("voice store unreachable, asking voice_prompt: %s", exc)
                data = None
            if data is not None:
                return decode_prompt(voice_id, data)
        prompt = self.stages.voice(audio, voice_id)
        if audio is not None:
            try:
                self.store.put_voice(_voice_id(prompt), encode_prompt(prompt))
            except UnavailableError as exc:
                log.warning("voice store unreachable, voice kept on this replica only: %s", exc)
        return prompt
