"""Multi-turn helpers (spec 3.5, 3.6): replaying a reply as an assistant turn, feeding a tool result back."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Literal

from stepaudio2.errors import InvalidInputError
from stepaudio2.text import tokens as T
from stepaudio2.text.tokenizer import SpecialIds
from stepaudio2.text.tools import ToolCall, parse_tool_calls

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
    """An `input` turn carrying a tool's result, then the optional instruction, as two text items (upstream's
    example sends them so, and each item is tokenised on its own)."""
    if not isinstance(result_text, str):
        raise InvalidInputError("a tool result must be a string")
    items = [{"type": "text", "text": result_text}]
    if instruction:
        items.append({"type": "text", "text": instruction})
    return {"role": "input", "content": items}


def _offered_tools(messages: Sequence[dict]) -> set[str]:
    names: set[str] = set()
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "tool_json_schemas":
            content = msg.get("content")
            if isinstance(content, str):
                try:
                    content = json.loads(content)
                except json.JSONDecodeError:
                    continue
            for spec in content if isinstance(content, list) else []:
                fn = spec.get("function") if isinstance(spec, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    names.add(fn["name"])
    return names


def _calls_in_turn(msg: dict, decode: Callable[[list[int]], str]) -> list[str]:
    """Names of the tool calls an assistant turn made (its text, its replayed token ids, or `tool_calls`)."""
    content = msg.get("content")
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            elif isinstance(item, dict) and item.get("type") == "token_ids" and isinstance(item.get("ids"), list):
                parts.append(decode(item["ids"]))
    names = [c.name for c in parse_tool_calls("".join(parts))[1]]
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        names.append(str(fn.get("name", "")) if isinstance(fn, dict) else "")
    return names


def check_tool_results(messages: Sequence[dict], decode: Callable[[list[int]], str]) -> None:
    """A tool result (`input` turn) must answer tool calls the assistant turn before it made, to tools the
    conversation offered. Raises InvalidInputError naming the message otherwise."""
    offered = _offered_tools(messages)
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("input", "tool"):
            continue
        prev = next((m for m in reversed(messages[:n]) if isinstance(m, dict) and m.get("role") not in ("input", "tool")),
                    None)
        calls = _calls_in_turn(prev, decode) if prev is not None and prev.get("role") == "assistant" else []
        if not calls:
            raise InvalidInputError(
                f"message #{n} ({msg.get('role')}) is a tool result, but the assistant turn before it made no tool call"
            )
        unknown = [c for c in calls if c not in offered]
        if unknown:
            raise InvalidInputError(
                f"message #{n} ({msg.get('role')}) answers a call to unknown tool '{unknown[0][:64]}' "
                f"(offered: {', '.join(sorted(offered)) or 'none'})"
            )
