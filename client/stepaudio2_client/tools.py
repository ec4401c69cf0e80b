"""Tool registry of the client: the model asks, the client runs the tool, the result goes back as an input turn."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

# Byte-for-byte the server's stepaudio2.text.WEB_SEARCH_TOOL (a test checks it): the schema is written into the
# prompt verbatim, so any other wording is a prompt the model was not trained on. Kept as a copy because the
# client must not import the server package.
WEB_SEARCH_SCHEMA: dict[str, Any] = {
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


class SearchBackend(Protocol):
    def search(self, query: str) -> list[dict[str, str]]: ...  # [{"title", "snippet", "url"}]


class WebSearchTool:
    """The web-search tool (upstream's `search` schema) with a pluggable backend (a search API client in production, a fixed one in tests)."""

    schema = WEB_SEARCH_SCHEMA

    def __init__(self, backend: SearchBackend, max_results: int = 3) -> None:
        self.backend = backend
        self.max_results = max_results

    def __call__(self, arguments: dict[str, Any]) -> str:
        query = str(arguments.get("query", "")).strip()
        if not query:
            return "search error: empty query"
        hits = self.backend.search(query)[: self.max_results]
        return "\n".join(f"{h.get('title', '')}: {h.get('snippet', '')} ({h.get('url', '')})" for h in hits)


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, tuple[dict, Callable[[dict], str]]] = {}

    def register(self, schema: dict[str, Any], fn: Callable[[dict], str]) -> None:
        self._tools[schema["function"]["name"]] = (schema, fn)

    def schemas(self) -> list[dict[str, Any]]:
        return [schema for schema, _ in self._tools.values()]

    def run(self, call: dict[str, Any]) -> str:
        name = call.get("name", "")
        if name not in self._tools:
            return f"tool error: unknown tool '{name}'"
        try:
            return self._tools[name][1](call.get("arguments") or {})
        except Exception as exc:  # a failing tool is reported to the model, not raised into the conversation
            return f"tool error: {name} failed: {exc}"

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def describe(self) -> str:
        return json.dumps(self.schemas(), ensure_ascii=False)
