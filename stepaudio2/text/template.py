"""Chat template (spec 3.2): `<|BOT|>{role}\\n{content}<|EOT|>` per turn, no separator between turns.

Content items: {"type": "text", "text": ...}, {"type": "audio", "chunks": [n1, n2, ...]} (one
`<audio_start>` + n x `<audio_patch>` + `<audio_end>` block per 25 s chunk) and {"type": "token_ids",
"ids": [...]} (pre-tokenised history). As in the HF path, every segment (role header, text item, audio block,
id list) is tokenised on its own and the ids are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stepaudio2.errors import InvalidInputError
from stepaudio2.text import tokens as T
from stepaudio2.text.tools import render_tool_call, tool_schemas_json

if TYPE_CHECKING:
    from stepaudio2.text.tokenizer import StepAudio2Tokenizer

Generation = Literal["text", "speech"]

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "human",
    "user": "human",
    "assistant": "assistant",
    "tool_json_schemas": "tool_json_schemas",
    "input": "input",
    "tool": "input",
    "function_output": "function_output",  # vLLM template role; accepted as is
}


@dataclass
class PromptIds:
    ids: list[int]
    # (index of the first `<audio_patch>`, number of patches) per audio block, in prompt order
    audio_spans: list[tuple[int, int]] = field(default_factory=list)


# A segment is ("text", str), ("plain", str: user text, control tokens stay text), ("audio", patch count) or
# ("ids", list of ids).
_Segment = tuple[str, Any]


def _text_item(text: Any, where: str) -> _Segment:
    if not isinstance(text, str):
        raise InvalidInputError(f"{where}: a text item needs a string 'text'")
    return ("text", text)


def _content_segments(role: str, content: Any, where: str) -> list[_Segment]:
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, (list, tuple)):
        raise InvalidInputError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    if role == "tool_json_schemas" and content and all(
        isinstance(i, dict) and i.get("type") == "function" for i in content
    ):
        return [("text", tool_schemas_json(list(content)))]
    out: list[_Segment] = []
    for k, item in enumerate(content):
        at = f"{where} item #{k}"
        if isinstance(item, str):
            out.append(("text", item))
            continue
        if not isinstance(item, dict):
            raise InvalidInputError(f"{at}: an item must be a dict with a 'type'")
        kind = item.get("type")
        if kind == "text":
            out.append(_text_item(item.get("text"), at))
        elif kind == "audio":
            chunks = item.get("chunks")
            if not isinstance(chunks, (list, tuple)) or not chunks:
                raise InvalidInputError(f"{at}: an audio item needs a non-empty 'chunks' list of patch counts")
            for n in chunks:
                # 0 is upstream's block for a chunk of <= 320 samples: `<audio_start><audio_end>`.
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise InvalidInputError(f"{at}: audio chunk patch count must be a non-negative integer, got {n!r}")
                out.append(("audio", n))
        elif kind == "token_ids":
            ids = item.get("ids")
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise InvalidInputError(f"{at}: a token_ids item needs 'ids', a list of non-negative integers")
            out.append(("ids", [int(i) for i in ids]))
        else:
            raise InvalidInputError(f"{at}: unknown content item type {kind!r} (text, audio or token_ids)")
    return out


def _tool_call_segments(calls: Any, where: str) -> list[_Segment]:
    """OpenAI-style `tool_calls` of an assistant message, written back as the model's markup."""
    if not isinstance(calls, (list, tuple)):
        raise InvalidInputError(f"{where}: tool_calls must be a list")
    out: list[_Segment] = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidInputError(f"{where}: tool call #{k} needs function.name")
        out.append(("text", render_tool_call(fn["name"], fn.get("arguments", {}))))
    return out


def _segments(messages: list[dict], generation: Generation | None, think: bool = False) -> list[_Segment]:
    if not isinstance(messages, (list, tuple)):
        raise InvalidInputError("messages must be a list of {'role', 'content'} dicts")
    if generation not in (None, "text", "speech"):
        raise InvalidInputError(f"unknown generation mode {generation!r} (text, speech or None)")
    segs: list[_Segment] = []
    for n, msg in enumerate(messages):
        where = f"message #{n}"
        if not isinstance(msg, dict):
            raise InvalidInputError(f"{where} is not a dict")
        raw_role = msg.get("role")
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise InvalidInputError(
                f"{where}: unknown role {raw_role!r} (choose from {', '.join(ROLE_ALIASES)})"
            )
        segs.append(("text", f"{T.BOT}{role}\n"))
        content = _content_segments(role, msg.get("content"), f"{where} ({raw_role})")
        if role != "assistant":
            # Text from users, tools and schemas is plain: "<|EOT|>" typed by a user must not end the turn.
            # Assistant turns are replies replayed from our own history (they carry <tts_start> and tool calls).
            content = [("plain", v) if k == "text" else (k, v) for k, v in content]
        segs += content
        if msg.get("tool_calls"):
            if role != "assistant":
                raise InvalidInputError(f"{where}: only assistant messages carry tool_calls")
            segs += _tool_call_segments(msg["tool_calls"], where)
        segs.append(("text", T.EOT))
    if think:
        # Upstream's think examples: the model reasons, closes with </think>, then answers (a spoken answer
        # opens with its own <tts_start>), so the opener is the same for text and speech.
        if generation is None:
            raise InvalidInputError("think mode needs a generation mode (text or speech)")
        segs.append(("text", f"{T.BOT}assistant\n{T.THINK_START}\n"))
    elif generation == "text":
        segs.append(("text", f"{T.BOT}assistant\n"))
    elif generation == "speech":
        segs.append(("text", f"{T.BOT}assistant\n{T.TTS_START}"))
    return segs


def _audio_block(n: int) -> str:
    return T.AUDIO_START + T.AUDIO_PATCH * n + T.AUDIO_END


def render_prompt(
    messages: list[dict],
    *,
    generation: Generation | None,
    tokenizer: StepAudio2Tokenizer | None = None,
    think: bool = False,
) -> str:
    """The prompt as one string. token_ids items are decoded, which needs `tokenizer`."""
    parts: list[str] = []
    for kind, value in _segments(messages, generation, think):
        if kind in ("text", "plain"):
            parts.append(value)
        elif kind == "audio":
            parts.append(_audio_block(value))
        else:
            if tokenizer is None:
                raise InvalidInputError("rendering a token_ids item needs the tokenizer")
            parts.append(tokenizer.decode(value))
    return "".join(parts)


def encode_prompt(
    tokenizer: StepAudio2Tokenizer, messages: list[dict], *, generation: Generation | None, think: bool = False
) -> PromptIds:
    """Prompt ids, each segment tokenised separately (HF quirk, spec 3.2), with the audio placeholder spans."""
    sp = tokenizer.special
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for kind, value in _segments(messages, generation, think):
        if kind == "text":
            ids += tokenizer.encode(value)
        elif kind == "plain":
            ids += tokenizer.encode_plain(value)
        elif kind == "audio":
            ids.append(sp.audio_start)
            spans.append((len(ids), value))
            ids += [sp.audio_patch] * value
            ids.append(sp.audio_end)
        else:
            # Not checked against the tokenizer size: replayed replies may hold ids of the padded model vocab.
            ids += value
    return PromptIds(ids, spans)
