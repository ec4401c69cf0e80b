"""Multi-turn sessions held by the server, for clients that do not carry the history themselves.

A request with `"session_id": "new"` opens a session; the result names its id. A later request with that id
sends only its new turns (`messages`, or `text` as a human turn) and the server prepends the conversation so far
(spoken turns included, replayed as their token ids) and reuses the session's audio. Bounded in count (least
recently used first out) and in idle time; an unknown or expired id is INVALID_ARGUMENT. Sessions live as files
in a directory, so every instance (process) of the pipeline model sees the same sessions.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

from stepaudio2.errors import InvalidInputError

NEW = "new"
_ID = re.compile(r"^[0-9a-f]{32}$")


class SessionStore:
    def __init__(self, root: str | Path, max_sessions: int = 1024, ttl_s: float = 1800.0,
                 max_messages: int = 256) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_messages = max_messages

    def _files(self) -> list[Path]:
        """Live session files, oldest first; expired ones are removed on the way."""
        now, live = time.time(), []
        for path in self.root.glob("*.json"):
            try:
                if now - path.stat().st_mtime > self.ttl_s:
                    path.unlink(missing_ok=True)
                else:
                    live.append(path)
            except FileNotFoundError:  # another instance removed it meanwhile
                continue
        return sorted(live, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)

    def __len__(self) -> int:
        return len(self._files())

    def _load(self, session_id: str) -> dict:
        path = self.root / f"{session_id}.json"
        try:
            if not _ID.match(session_id) or time.time() - path.stat().st_mtime > self.ttl_s:
                raise FileNotFoundError
            state = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            raise InvalidInputError(
                f"session_id '{session_id[:64]}' does not exist (never opened or expired)"
            ) from None
        os.utime(path)  # touched: least recently used goes first
        return state

    def continue_request(self, session_id: str, obj: dict, audio: list[bytes]) -> tuple[dict, list[bytes]]:
        """The full request for a follow-up in session `session_id`: stored history + the request's new turns.
        The session's audio clips come first, the request's new clips after them (new audio items without an
        index take the first clip no earlier turn uses)."""
        state = self._load(session_id)
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
        stored = [base64.b64decode(a) for a in state.get("audios") or []]
        obj["messages"] = [*state["messages"], *new_turns]
        obj["generation"] = state["generation"]
        return obj, [*stored, *audio]

    def save(self, session_id: str, messages: list[dict], generation: str, audio: list[bytes]) -> str:
        """Store the conversation after a reply; `NEW` opens a session and returns its id."""
        if len(messages) > self.max_messages:
            raise InvalidInputError(f"session is longer than {self.max_messages} messages; start a new one")
        key = uuid.uuid4().hex if session_id == NEW else session_id
        data = {"messages": messages, "generation": generation,
                "audios": [base64.b64encode(a).decode() for a in audio]}
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, self.root / f"{key}.json")  # atomic: readers see the old or the new conversation
        files = self._files()
        for path in files[: max(0, len(files) - self.max_sessions)]:
            path.unlink(missing_ok=True)
        return key
