"""Tool calling: schema serialisation and parsing of `<tool_call>function\\n{name}\\n{json}</tool_call>` (spec 3.6)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stepaudio2.errors import InvalidInputError
from stepaudio2.text.tokens import TOOL_CALL_END, TOOL_CALL_START

# The default web-search tool, exactly as upstream's tool-call example defines it (name `search`, its
# description and `additionalProperties: false`): the schema is written into the prompt verbatim.
WEB_SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "搜索工具",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "搜索关键词"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""  # the full markup as the model wrote it, for replaying history
    error: str | None = None  # set when the body could not be parsed; arguments is then {}
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "arguments": self.arguments}
        if self.error:
            out["error"] = self.error
        return out


def validate_tools(tools: list[dict]) -> list[dict]:
    """Check OpenAI-style function specs: each needs type 'function' and a function name."""
    if not isinstance(tools, (list, tuple)):
        raise InvalidInputError("tools must be a list of OpenAI-style function specs")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidInputError(f"tool #{i} is not an OpenAI-style spec {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInputError(f"tool #{i} has no function name")
    return list(tools)


def tool_schemas_json(tools: list[dict]) -> str:
    """The tool_json_schemas turn body: a JSON list, non-ASCII kept, default json.dumps separators."""
    return json.dumps(validate_tools(tools), ensure_ascii=False)


def render_tool_call(name: str, arguments: dict[str, Any] | str) -> str:
    """Markup of one call, as the model writes it. A JSON-string `arguments` is re-serialised as an object
    (spec 3.6 pitfall: OpenAI clients send it as a string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"tool call '{name}' has arguments that are not JSON: {exc}") from exc
    return f"{TOOL_CALL_START}function\n{name}\n{json.dumps(arguments, ensure_ascii=False)}{TOOL_CALL_END}"


def parse_tool_call_body(body: str) -> ToolCall:
    """One call from the text between the tags. Never raises: problems land in `error`."""
    raw = f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"
    text = body.lstrip("\n")
    if text.lstrip().startswith("{"):
        # Tolerate Qwen/hermes-style bodies: {"name": ..., "arguments": {...}}.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return ToolCall("", {}, raw, f"tool call body is not valid JSON: {exc}")
        name = obj.get("name") if isinstance(obj, dict) else None
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if not isinstance(name, str) or not isinstance(args, dict):
            return ToolCall(str(name or ""), {}, raw, "tool call JSON body needs 'name' and an object 'arguments'")
        return ToolCall(name, args, raw)
    parts = text.split("\n", 2)
    kind = parts[0].strip()
    name = parts[1].strip() if len(parts) > 1 else ""
    args_text = parts[2].strip() if len(parts) > 2 else ""
    if not name:
        return ToolCall("", {}, raw, "tool call has no function name", kind or "function")
    if not args_text:
        return ToolCall(name, {}, raw, None, kind)
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as exc:
        return ToolCall(name, {}, raw, f"arguments are not valid JSON: {exc}", kind)
    if not isinstance(args, dict):
        return ToolCall(name, {}, raw, f"arguments must be a JSON object, got {type(args).__name__}", kind)
    return ToolCall(name, args, raw, None, kind)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split finished text into content (markup removed) and calls. An unclosed `<tool_call>` stays text."""
    parser = StreamingToolCallParser()
    content, calls = parser.feed(text)
    rest, more = parser.flush()
    return content + rest, calls + more


def _partial_prefix_len(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag`."""
    for k in range(min(len(buf), len(tag) - 1), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


class StreamingToolCallParser:
    """Incremental version of parse_tool_calls.

    Text is emitted as soon as it cannot be the start of `<tool_call>`; a call is emitted when `</tool_call>`
    arrives. Feeding any split of a text then flushing gives exactly parse_tool_calls(text).
    """

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False

    @property
    def in_call(self) -> bool:
        return self._inside

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._inside:
                i = self._buf.find(TOOL_CALL_START)
                if i >= 0:
                    out.append(self._buf[:i])
                    self._buf = self._buf[i + len(TOOL_CALL_START) :]
                    self._inside = True
                    continue
                keep = _partial_prefix_len(self._buf, TOOL_CALL_START)
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            j = self._buf.find(TOOL_CALL_END)
            if j < 0:
                break
            calls.append(parse_tool_call_body(self._buf[:j]))
            self._buf = self._buf[j + len(TOOL_CALL_END) :]
            self._inside = False
        return "".join(out), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """End of stream: withheld text comes out; an unclosed call is returned as plain text."""
        text = (TOOL_CALL_START + self._buf) if self._inside else self._buf
        self._buf, self._inside = "", False
        return text, []
