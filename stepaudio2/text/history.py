"""Multi-turn helpers (spec 3.5, 3.6): replaying a reply as an assistant turn, feeding a tool result back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from stepaudio2.errors import InvalidInputError
from stepaudio2.text import tokens as T
from stepaudio2.text.tokenizer import SpecialIds
from stepaudio2.text.tools import ToolCall

# Appended to the tool result by the upstream example (spec 3.6).
DEFAULT_TOOL_RESULT_INSTRUCTION = "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"


def assistant_turn_from_reply(
    prompt_generation: Literal["text", "speech"],
    token_ids: Sequence[int],
    text: str,
    *,
    special: SpecialIds | None = None,
    tool_calls: Sequence[ToolCall] = (),
) -> dict:
    """The assistant turn to put in the history for a reply.

    Speech: the HF path replays `<tts_start>` followed by the exact generated ids (ta4 section, anything after
    `<tts_end>` such as a tool call included); trailing end-of-turn ids are stripped when `special` is given,
    otherwise `token_ids` must already exclude the final `<|EOT|>` (the template adds it).
    Text: the plain text; `tool_calls` (markup removed from `text` by the demuxer) are written back after it.
    """
    if prompt_generation == "speech":
        ids = [int(i) for i in token_ids]
        if special is not None:
            while ids and ids[-1] in special.end_ids:
                ids.pop()
        return {
            "role": "assistant",
            "content": [{"type": "text", "text": T.TTS_START}, {"type": "token_ids", "ids": ids}],
        }
    if prompt_generation == "text":
        if not isinstance(text, str):
            raise InvalidInputError("a text reply must be replayed from its text")
        return {"role": "assistant", "content": text + "".join(c.raw for c in tool_calls)}
    raise InvalidInputError(f"unknown generation mode {prompt_generation!r} (text or speech)")


def tool_result_turn(result_text: str, instruction: str | None = DEFAULT_TOOL_RESULT_INSTRUCTION) -> dict:
    """An `input` turn carrying a tool's result, followed by the optional instruction."""
    if not isinstance(result_text, str):
        raise InvalidInputError("a tool result must be a string")
    return {"role": "input", "content": result_text + (instruction or "")}
