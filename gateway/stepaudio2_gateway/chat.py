"""`POST /v1/chat/completions` bodies: validation (400 naming the field, OpenAI's dotted paths) and the one
mapping from OpenAI messages to a `pipeline` request.

Today's pipeline request carries one audio clip, referenced by an {"type": "audio"} placeholder in the messages;
`pipeline_request` is the only place that knows this, so that several clips per request only change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stepaudio2_gateway import MODEL_ID
from stepaudio2_gateway.audio import check_audio, decode_b64
from stepaudio2_gateway.errors import APIError, bad
from stepaudio2_gateway.prompts import (
    CHAT_PROMPT,
    SAMPLING_DEFAULTS,
    TOOL_ABILITY_PROMPT,
    TOOL_RESULT_INSTRUCTION,
    TTS_END,
    TTS_START,
    VOICE_CHAT_PROMPT,
)

AUDIO_OUT_FORMATS = ("wav", "pcm16")
AUDIO_IN_FORMATS = ("wav", "mp3", "flac", "ogg")
MAX_NEW_TOKENS = 16384  # the server's bound (stepaudio2.engines.sampling)
# Accepted and ignored (no effect on this model) when they have their neutral value.
NEUTRAL = {"n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0, "parallel_tool_calls": None,
           "user": None, "metadata": None, "store": None, "service_tier": None, "top_logprobs": None}
KNOWN = {"model", "messages", "modalities", "audio", "tools", "tool_choice", "temperature", "top_p", "max_tokens",
         "max_completion_tokens", "seed", "stop", "stream", "stream_options", "response_format", "stepaudio2",
         *NEUTRAL}


@dataclass
class ChatParams:
    messages: list[dict]
    speech: bool
    audio_format: str = "wav"
    voice: str = "default"
    tools: list[dict] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    speech_seed: int | None = None


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
            param: str | None = None) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}", param or name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise bad(f"'{name}'={value} is out of range: it must be in {'(' if lo_open else '['}{lo}, {hi}]",
                  param or name)
    return value


def parse_chat(body: Any, known_voice: Callable[[str], bool]) -> ChatParams:
    """Check every field of a chat completion request; unknown or unsupported fields are a 400 naming them."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], code="unknown_parameter")
    for name, neutral in NEUTRAL.items():
        if neutral is not None and body.get(name) not in (None, neutral):
            raise bad(f"'{name}'={body[name]!r} is not supported by {MODEL_ID} (only {neutral!r})", name)
    check_model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or sorted(set(modalities)) not in (["text"], ["audio", "text"]):
        raise bad("'modalities' must be [\"text\"] or [\"text\", \"audio\"]", "modalities")
    params = ChatParams(messages=messages, speech="audio" in modalities)
    audio = body.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise bad("'audio' must be an object {voice, format}", "audio")
        if not params.speech:
            raise bad("'audio' is only allowed with modalities [\"text\", \"audio\"]", "audio")
        params.voice = audio.get("voice", "default")
        params.audio_format = audio.get("format", "wav")
    params.stream = _flag(body, "stream")
    if params.speech:
        if not isinstance(params.voice, str) or not known_voice(params.voice):
            raise bad(f"unknown voice {params.voice!r}: use 'default' or a voice registered with "
                      "POST /v1/audio/voices", "audio.voice", code="unknown_voice")
        if params.audio_format not in AUDIO_OUT_FORMATS:
            raise bad(f"audio.format must be one of {', '.join(AUDIO_OUT_FORMATS)}", "audio.format")
        if params.stream and params.audio_format != "pcm16":
            raise bad("streamed audio is pcm16: set audio.format to \"pcm16\" with stream=true", "audio.format")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not params.stream:
            raise bad("'stream_options' is an object and needs stream=true", "stream_options")
        params.include_usage = _flag(opts, "include_usage", "stream_options.include_usage")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise bad("only response_format {\"type\": \"text\"} is supported", "response_format")
    params.tools = _tools(body)
    params.sampling = _sampling(body, "speech" if params.speech else "text")
    params.stop = _stop(body.get("stop"))
    ext = body.get("stepaudio2") or {}
    if not isinstance(ext, dict) or set(ext) - {"top_k", "repetition_penalty", "speech_seed"}:
        raise bad("'stepaudio2' takes only top_k, repetition_penalty, speech_seed", "stepaudio2")
    if (v := _number(ext, "top_k", 0, 1_000_000, integer=True, param="stepaudio2.top_k")) is not None:
        params.sampling["top_k"] = v
    if (v := _number(ext, "repetition_penalty", 0, 10, lo_open=True,
                     param="stepaudio2.repetition_penalty")) is not None:
        params.sampling["repetition_penalty"] = v
    params.speech_seed = _number(ext, "speech_seed", 0, 2**63 - 1, integer=True, param="stepaudio2.speech_seed")
    return params


def check_model(model: Any, param: str = "model") -> None:
    if not isinstance(model, str) or not model:
        raise bad("'model' is required", param)
    if model != MODEL_ID:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{MODEL_ID}'",
                       param=param, code="model_not_found")


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean", param or name)
    return value


def _tools(body: dict) -> list[dict]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad("each tool must be {\"type\": \"function\", \"function\": {\"name\", ...}}", f"tools[{i}]")
    if choice not in (None, "auto", "none"):
        raise bad("'tool_choice' must be \"auto\" or \"none\": the model decides itself whether to call a tool",
                  "tool_choice")
    return [] if choice == "none" else tools


def _sampling(body: dict, kind: str) -> dict[str, Any]:
    sampling = dict(SAMPLING_DEFAULTS[kind])
    if (v := _number(body, "temperature", 0, 2)) is not None:
        sampling["temperature"] = v
    if (v := _number(body, "top_p", 0, 1, lo_open=True)) is not None:
        sampling["top_p"] = v
    for name in ("max_completion_tokens", "max_tokens"):
        if (v := _number(body, name, 1, MAX_NEW_TOKENS, integer=True)) is not None:
            sampling["max_new_tokens"] = v
    if (v := _number(body, "seed", 0, 2**63 - 1, integer=True)) is not None:
        sampling["seed"] = v
    return sampling


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of 1 to 4 of them", "stop")
    return stops


# ---- the mapping ------------------------------------------------------------------------------------------------


@dataclass
class PipelineCall:
    request: dict[str, Any]  # the pipeline's JSON request
    audio: bytes | None  # the one audio clip the messages refer to


def _text_of(content: Any, where: str) -> str:
    """String content, or a list of text parts joined (system, developer, tool and assistant messages)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text parts are allowed here", f"{where}.content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad("'content' must be a string or a list of parts", f"{where}.content")


def _user_content(content: Any, where: str, max_seconds: float, clips: list[bytes]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad("'content' must be a string or a non-empty list of parts", f"{where}.content")
    items: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": part["text"]})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict):
                raise bad("'input_audio' must be an object {data, format}", f"{at}.input_audio")
            if audio.get("format", "wav") not in AUDIO_IN_FORMATS:
                raise bad(f"input_audio.format must be one of {', '.join(AUDIO_IN_FORMATS)}", f"{at}.input_audio.format")
            raw = decode_b64(audio.get("data"), f"{at}.input_audio.data")
            check_audio(raw, f"{at}.input_audio.data", max_seconds)
            if clips:  # today's pipeline request carries one clip
                raise bad("this server takes one input_audio per request (history included)", at)
            clips.append(raw)
            items.append({"type": "audio"})
        else:
            raise bad(f"unsupported content part type {kind!r} (text or input_audio)", f"{at}.type")
    return items


def pipeline_request(params: ChatParams, replay: Callable[[str], dict | None], max_seconds: float) -> PipelineCall:
    """OpenAI messages -> the pipeline's explicit-messages request (roles, audio placeholder, tool turns)."""
    generation = "speech" if params.speech else "text"
    system: list[str] = []
    turns: list[dict] = []
    clips: list[bytes] = []
    for i, msg in enumerate(params.messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"), where)
            if turns:  # a later system message stays where it is
                turns.append({"role": "system", "content": text})
            else:
                system.append(text)
        elif role == "user":
            turns.append({"role": "human", "content": _user_content(msg.get("content"), where, max_seconds, clips)})
        elif role == "assistant":
            turns.append(_assistant_turn(msg, where, generation, replay))
        elif role == "tool":
            if not isinstance(msg.get("tool_call_id"), str):
                raise bad("a tool message needs 'tool_call_id'", f"{where}.tool_call_id")
            turns.append({"role": "input", "content": _text_of(msg.get("content"), where) + TOOL_RESULT_INSTRUCTION})
        else:
            raise bad(f"unknown role {role!r} (system, developer, user, assistant or tool)", f"{where}.role")
    prompt = "\n".join(system) if system else (VOICE_CHAT_PROMPT if params.speech else CHAT_PROMPT)
    if params.tools:
        prompt += "\n" + TOOL_ABILITY_PROMPT
    head = [{"role": "system", "content": prompt}]
    if params.tools:
        head.append({"role": "tool_json_schemas", "content": params.tools})
    request: dict[str, Any] = {
        "messages": head + turns, "generation": generation, "sampling": params.sampling,
        "speech_output": "stream" if params.speech else "none",
    }
    if params.speech_seed is not None:
        request["speech_seed"] = params.speech_seed
    return PipelineCall(request, clips[0] if clips else None)


def _assistant_turn(msg: dict, where: str, generation: str, replay: Callable[[str], dict | None]) -> dict:
    audio = msg.get("audio")
    content = msg.get("content")
    if isinstance(audio, dict) and audio.get("id") is not None:
        turn = replay(audio["id"]) if isinstance(audio["id"], str) else None
        if turn is not None:  # the exact spoken turn (text + speech codes) this gateway answered
            return turn
        if content is None:
            raise bad("unknown or expired audio id; send the reply's transcript as 'content' instead",
                      f"{where}.audio.id", code="audio_expired")
    text = "" if content is None else _text_of(content, where)
    calls = msg.get("tool_calls")
    if calls is None:
        return {"role": "assistant", "content": text}
    if not isinstance(calls, list) or not calls:
        raise bad("'tool_calls' must be a non-empty list", f"{where}.tool_calls")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad("a tool call needs function.name and function.arguments (a JSON string)",
                      f"{where}.tool_calls[{k}]")
    parsed = [{"function": {"name": c["function"]["name"], "arguments": _arguments(c, f"{where}.tool_calls[{k}]")}}
              for k, c in enumerate(calls)]
    # A spoken reply that called a tool: the model wrote `<tts_end>` (no speech) and then the call.
    items = [TTS_START, TTS_END] if generation == "speech" and not text else [text]
    return {"role": "assistant", "content": [{"type": "text", "text": t} for t in items], "tool_calls": parsed}


def _arguments(call: dict, where: str) -> dict:
    import json

    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError as exc:
        raise bad(f"function.arguments is not valid JSON: {exc}", f"{where}.function.arguments") from exc
    if not isinstance(args, dict):
        raise bad("function.arguments must be a JSON object", f"{where}.function.arguments")
    return args
