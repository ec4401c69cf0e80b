"""Multi-turn sessions held by the server, for clients that do not carry the history themselves.

A request with `"session_id": "new"` opens a session; the result names its id. A later request with that id
sends only its new turns (`messages`, or `text` as a human turn) and the server prepends the conversation so far
(spoken turns included, replayed as their token ids) and reuses the session's audio. Bounded in count (least
recently used first out) and in idle time; an unknown or expired id is INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from stepaudio2.errors import InvalidInputError

NEW = "new"


@dataclass
class SessionState:
    messages: list[dict]  # wire form, ending with the last assistant turn
    generation: str
    audio: bytes | None
    touched: float


class SessionStore:
    def __init__(self, max_sessions: int = 1024, ttl_s: float = 1800.0, max_messages: int = 256) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_messages = max_messages
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._sessions)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.touched > self.ttl_s]:
            del self._sessions[key]

    def continue_request(self, session_id: str, obj: dict, audio: bytes | None) -> tuple[dict, bytes | None]:
        """The full request for a follow-up in session `session_id`: stored history + the request's new turns."""
        with self._lock:
            self._expire(time.monotonic())
            state = self._sessions.get(session_id)
            if state is None:
                raise InvalidInputError(f"session_id '{session_id[:64]}' does not exist (never opened or expired)")
            self._sessions.move_to_end(session_id)
        turns = obj.pop("messages", None)
        text = obj.pop("text", None)
        if turns is None and text is None:
            raise InvalidInputError("a follow-up in a session needs 'messages' (new turns) or 'text'")
        if turns is not None and not isinstance(turns, list):
            raise InvalidInputError("request field 'messages' must be a list")
        new_turns = list(turns or []) + ([{"role": "human", "content": text}] if text is not None else [])
        for name in ("task", "history", "tools", "generation"):
            if obj.pop(name, None) is not None:
                raise InvalidInputError(f"request field '{name}' is fixed by the session; leave it out of follow-ups")
        if audio and state.audio:
            raise InvalidInputError("this session already has its audio; a follow-up cannot bring new audio")
        obj["messages"] = [*state.messages, *new_turns]
        obj["generation"] = state.generation
        return obj, audio or state.audio

    def save(self, session_id: str, messages: list[dict], generation: str, audio: bytes | None) -> str:
        """Store the conversation after a reply; `NEW` opens a session and returns its id."""
        if len(messages) > self.max_messages:
            raise InvalidInputError(f"session is longer than {self.max_messages} messages; start a new one")
        key = uuid.uuid4().hex if session_id == NEW else session_id
        with self._lock:
            self._sessions[key] = SessionState(messages, generation, audio, time.monotonic())
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return key
