"""Text side of Step-Audio-2: tokenizer, chat template, task presets, output demultiplexing, tool calls.

No torch here: only the `tokenizers` library and the standard library.
"""

from __future__ import annotations

from stepaudio2.text.build import write_tokenizer_files
from stepaudio2.text.demux import (
    AudioCodes,
    DemuxResult,
    EndOfTurn,
    Event,
    OutputDemuxer,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    demux_all,
)
from stepaudio2.text.history import (
    DEFAULT_TOOL_RESULT_INSTRUCTION,
    assistant_turn_from_reply,
    check_tool_results,
    tool_result_turn,
)
from stepaudio2.text.tasks import (
    TASKS,
    TOOL_ABILITY_PROMPT,
    TaskPreset,
    build_messages,
    build_system_prompt,
    get_task,
    list_tasks,
)
from stepaudio2.text.template import PromptIds, encode_prompt, render_prompt
from stepaudio2.text.tokenizer import IncrementalDecoder, SpecialIds, StepAudio2Tokenizer
from stepaudio2.text.tools import (
    WEB_SEARCH_TOOL,
    StreamingToolCallParser,
    ToolCall,
    parse_tool_calls,
    render_tool_call,
    tool_schemas_json,
)

__all__ = [
    "AudioCodes",
    "DEFAULT_TOOL_RESULT_INSTRUCTION",
    "DemuxResult",
    "EndOfTurn",
    "Event",
    "IncrementalDecoder",
    "OutputDemuxer",
    "PromptIds",
    "SpecialIds",
    "StepAudio2Tokenizer",
    "StreamingToolCallParser",
    "TASKS",
    "TOOL_ABILITY_PROMPT",
    "TaskPreset",
    "TextDelta",
    "ToolCall",
    "ToolCallEvent",
    "ReasoningDelta",
    "WEB_SEARCH_TOOL",
    "assistant_turn_from_reply",
    "check_tool_results",
    "build_messages",
    "build_system_prompt",
    "demux_all",
    "encode_prompt",
    "get_task",
    "list_tasks",
    "parse_tool_calls",
    "render_prompt",
    "render_tool_call",
    "tool_result_turn",
    "tool_schemas_json",
    "write_tokenizer_files",
]
