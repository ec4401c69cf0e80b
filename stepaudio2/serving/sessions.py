"""Multi-turn sessions held by the server, for clients that do not carry the history themselves.

A request with `"session_id": "new"` opens a session; the result names its id. A later request with that id
sends only its new turns (`messages`, or `text` as a human turn) and the server prepends the conversation so far
(spoken turns included, replayed as their token ids) and reuses the session's audio. Bounded in count (least
recently used first out) and in idle time; an unknown or expired id is INVALID_ARGUMENT. Where the sessions live
is a `StateStore` (session_store.py): files shared by every pipeline instance (default) or Redis shared by every
replica. A request holds its session's lease from `begin` to `end`, so two requests of one session never
interleave their history (the second is refused while the first runs).
"""

from __future__ import annotations

import base64

from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.session_store import Lease, StateStore

NEW = "new"


class SessionStore:
    def __init__(self, store: StateStore, max_messages: int = 256) -> None:
        self.store = store
        self.max_messages = max_messages

    def __len__(self) -> int:
        return self.store.count()

    def begin(self, session_id: str) -> Lease | None:
        """Hold an existing session for this request (None for `NEW`: nothing to hold yet)."""
        return None if session_id == NEW else self.store.acquire(session_id)

    def end(self, lease: Lease | None) -> None:
        if lease is not None:
            self.store.release(lease)

    def continue_request(self, lease: Lease, obj: dict, audio: list[bytes]) -> tuple[dict, list[bytes]]:
        """The full request for a follow-up in the held session: stored history + the request's new turns.
        The session's audio clips come first, the request's new clips after them (new audio items without an
        index take the first clip no earlier turn uses)."""
        state = lease.state
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

    def save(self, lease: Lease | None, messages: list[dict], generation: str, audio: list[bytes],
             voice_id: str | None = None) -> str:
        """Store the conversation after a reply (lease None: open a new session); returns the session id.
        `voice_id`: the voice the conversation speaks in, reused by later turns that name none."""
        if len(messages) > self.max_messages:
            raise InvalidInputError(f"session is longer than {self.max_messages} messages; start a new one")
        data = {"messages": messages, "generation": generation,
                "audios": [base64.b64encode(a).decode() for a in audio], "voice_id": voice_id}
        if lease is None:
            return self.store.create(data)
        self.store.commit(lease, data)
        return lease.session_id
