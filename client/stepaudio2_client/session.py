"""Multi-turn sessions held by the client: the history travels with each request as `messages`.

A tool call in a reply is run through the registry and its result sent back as an `input` turn; the model then
answers (spoken, for speech tasks) in the same session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from stepaudio2_client.client import StepAudio2Client
from stepaudio2_client.tools import ToolRegistry

TOOL_RESULT_INSTRUCTION = "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"
MAX_TOOL_ROUNDS = 4


class Session:
    def __init__(
        self, client: StepAudio2Client, tools: ToolRegistry | None = None, voice: bytes | None = None
    ) -> None:
        self.client = client
        self.tools = tools or ToolRegistry()
        self.voice = voice  # reference wav for spoken replies (None: the server's default voice)
        self.messages: list[dict] | None = None  # full conversation (wire form) after the last reply
        self.generation: str | None = None
        # Every audio clip of the conversation, in order: the history's audio items refer to them by index.
        self.audio: list[bytes] = []

    def ask(
        self, request: dict[str, Any], audio: bytes | list[bytes] | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> dict:
        """First turn: a task request (tools from the registry are added), or a whole conversation (`messages`,
        with every clip its audio items refer to in `audio`, in index order; its tools travel as its
        tool_json_schemas turn). Runs tool rounds automatically."""
        if self.tools.schemas() and "tools" not in request and "messages" not in request:
            request = {**request, "tools": self.tools.schemas()}
        self.audio = list(audio) if isinstance(audio, list) else ([audio] if audio else [])
        result = self._run(request, on_event)
        rounds = 0
        while result.get("tool_calls") and rounds < MAX_TOOL_ROUNDS:
            rounds += 1
            outputs = "\n".join(self.tools.run(call) for call in result["tool_calls"])
            # Two text items, as upstream sends a tool result: each is tokenised on its own.
            turn = {"role": "input", "content": [{"type": "text", "text": outputs},
                                                 {"type": "text", "text": TOOL_RESULT_INSTRUCTION}]}
            result = self.follow_up(turn, request.get("sampling"), on_event)
        return result

    def follow_up(self, turn: dict, sampling: dict | None = None, on_event=None, audio: bytes | None = None) -> dict:
        """Send one more turn (human text, a tool result, or a spoken turn: `audio` with an {"type": "audio"} item
        in `turn`, which takes the new clip) in this conversation; earlier audio turns stay in the history."""
        if self.messages is None:
            raise RuntimeError("follow_up before the first ask()")
        if audio:
            self.audio.append(audio)
        request = {"messages": [*self.messages, turn], "generation": self.generation}
        if sampling:
            request["sampling"] = sampling
        return self._run(request, on_event)

    def _run(self, request: dict, on_event) -> dict:
        result: dict | None = None
        for event in self._events(request):
            if on_event is not None:
                on_event(event)
            if event.get("type") == "result":
                result = event
        assert result is not None  # the client raises when the stream ends without one
        self.messages = [*result["messages"], result["assistant_turn"]]
        self.generation = result["generation"]
        return result

    def _events(self, request: dict) -> Iterator[dict]:
        yield from self.client.stream(request, self.audio, voice=self.voice)
