"""Requests and results of generation, and the prompt builder. Torch-free: the server's pipeline model and the
reference pipeline share it, so both build byte-identical prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import InvalidInputError


@dataclass
class AudioInput:
    """One audio item of a request: mono float samples at `sample_rate`."""

    samples: np.ndarray
    sample_rate: int


@dataclass
class GenerationRequest:
    task: str | None = "chat"
    text: str | None = None
    audio: AudioInput | None = None  # one clip (shorthand for audios=[audio])
    # Every audio clip of the request, in order: earlier spoken turns and the new one. Audio items of `messages` /
    # `history` refer to them by {"type": "audio", "index": k}, or take them in order when they carry no index;
    # a task preset's new human turn gets the one clip no history item refers to.
    audios: list[AudioInput] = field(default_factory=list)
    messages: list[dict] | None = None  # explicit chat messages instead of a task preset
    generation: str | None = None  # "text" | "speech" with explicit messages
    history: list[dict] | None = None
    tools: list[dict] | None = None
    speed: str | None = None
    voice: str | None = None
    target_language: str | None = None
    today: str | None = None  # ISO date for the tool persona's date line (default: the server's date)
    think: bool = False  # upstream's think mode: reason after `<think>\n`, answer after `</think>`
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    tts_text: str
    audio_codes: list[int]
    tool_calls: list[dict[str, Any]]
    finish_reason: str  # "stop" (end of turn) | "length"
    prompt_tokens: int
    time_to_first_token_s: float
    total_s: float
    generation: str = "text"
    messages: list[dict] = field(default_factory=list)
    assistant_turn: dict | None = None
    reasoning: str | None = None  # think mode only: the reasoning text (never spoken, not in the history)

    def to_json(self) -> dict[str, Any]:
        """The result object of `generate --json` and of the served pipeline. `messages` + `assistant_turn` let a
        client continue the conversation (multi-turn, tool results) by sending them back as `messages`."""
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "tts_text": self.tts_text,
            "audio_codes": self.audio_codes,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
            "generation": self.generation,
            "messages": wire_messages(self.messages),
            "assistant_turn": self.assistant_turn,
            **({"reasoning": self.reasoning} if self.reasoning is not None else {}),
        }


def wire_messages(messages: list[dict]) -> list[dict]:
    """Messages as a client re-sends them: audio items become {"type": "audio", "index": k} placeholders that the
    request's k-th audio clip fills again (so the client re-sends the clips in the same order)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = [_audio_placeholder(i) if isinstance(i, dict) and i.get("type") == "audio" else i
                       for i in content]
        out.append({**msg, "content": content})
    return out


def _audio_placeholder(item: dict) -> dict:
    return {"type": "audio", "index": item["index"]} if "index" in item else {"type": "audio"}


@dataclass
class Prompt:
    ids: list[int]
    audio_spans: list[tuple[int, int]]
    mels: list[np.ndarray]
    mel_lengths: list[int]
    generation: str
    messages: list[dict]
    think: bool = False


class _Clips:
    """The request's audio clips, featurised on first use, and the mel chunks in the order the prompt uses them."""

    def __init__(self, clips: list[AudioInput]) -> None:
        self.clips = clips
        self.features: dict[int, Any] = {}
        self.used: set[int] = set()
        self.mels: list[np.ndarray] = []
        self.lengths: list[int] = []

    def item(self, k: int, where: str) -> dict:
        from stepaudio2.audio import prepare_audio

        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.clips):
            raise InvalidInputError(
                f"{where}: audio index {k!r} does not name one of the request's {len(self.clips)} audio clip(s)"
            )
        if k not in self.features:
            self.features[k] = prepare_audio(self.clips[k].samples, self.clips[k].sample_rate)
        feats = self.features[k]
        self.used.add(k)
        self.mels += list(feats.mels)
        self.lengths += list(feats.valid_lengths)
        return {"type": "audio", "chunks": list(feats.placeholder_counts), "index": k}

    def fill(self, messages: list[dict], what: str) -> list[dict]:
        """Audio items without chunks get the referenced clip's chunk counts (by "index", else the next clip)."""
        out = []
        for n, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, list):
                items = []
                for item in content:
                    if isinstance(item, dict) and item.get("type") == "audio" and "chunks" not in item:
                        if "index" in item:
                            k = item["index"]
                        else:  # the first clip no earlier item took (a session's new turn gets the new clip)
                            k = next((j for j in range(len(self.clips)) if j not in self.used), len(self.clips))
                            if k >= len(self.clips):
                                raise InvalidInputError(
                                    f"{what} #{n} has an audio item but the request carries no (more) audio"
                                )
                        item = self.item(k, f"{what} #{n}")
                    items.append(item)
                msg = {**msg, "content": items}
            out.append(msg)
        return out

    def unused(self) -> list[int]:
        return [k for k in range(len(self.clips)) if k not in self.used]


def stop_ids(tokenizer, config, params: SamplingParams) -> set[int]:
    """End-of-turn ids: EOT, endoftext, the config's eos list, and the request's own stop ids."""
    sp = tokenizer.special
    stops = {sp.eot, sp.endoftext, *params.stop_ids}
    eos = config.text.eos_token_id
    stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return stops


def build_prompt(tokenizer, request: GenerationRequest) -> Prompt:
    """Audio features + prompt ids for a request: the one prompt builder of the reference and served pipelines."""
    from stepaudio2.text import build_messages, check_tool_results, encode_prompt

    if request.audio is not None and request.audios:
        raise InvalidInputError("give the request's audio as 'audio' (one clip) or 'audios' (a list), not both")
    clips = _Clips(list(request.audios) if request.audios else [request.audio] if request.audio else [])
    if request.messages is not None:
        if not isinstance(request.messages, list):
            raise InvalidInputError("request field 'messages' must be a list")
        messages = clips.fill(request.messages, "message")
        generation = request.generation or "text"
        if generation not in ("text", "speech"):
            raise InvalidInputError(f"unknown generation mode '{generation}' (text or speech)")
    else:
        if request.task is None:
            raise InvalidInputError("a request needs a 'task' or 'messages'")
        history = clips.fill(request.history, "history turn") if isinstance(request.history, list) else \
            request.history
        new_turn = clips.unused()
        if len(new_turn) > 1:
            raise InvalidInputError(
                f"the request carries {len(new_turn)} audio clips no history turn refers to; the new turn takes one"
            )
        chunks = clips.item(new_turn[0], "the new turn")["chunks"] if new_turn else None
        messages, generation = build_messages(
            request.task,
            audio_chunks=chunks,
            text=request.text,
            history=history,
            tools=request.tools,
            speed=request.speed,
            voice=request.voice,
            target_language=request.target_language,
            today=request.today,
        )
    unused = clips.unused()
    if unused:
        raise InvalidInputError(f"the request carries audio clip #{unused[0]} but no message has an audio item for it")
    mels, lengths = clips.mels, clips.lengths
    check_tool_results(messages, tokenizer.decode)
    if not isinstance(request.think, bool):
        raise InvalidInputError("request field 'think' must be true or false")
    encoded = encode_prompt(tokenizer, messages, generation=generation, think=request.think)
    if len(encoded.audio_spans) != len(mels):
        raise InvalidInputError(
            f"prompt has {len(encoded.audio_spans)} audio block(s) but {len(mels)} audio chunk(s) were given"
        )
    return Prompt(encoded.ids, list(encoded.audio_spans), mels, lengths, generation, messages, request.think)


REQUEST_FIELDS = (
    "task", "text", "messages", "generation", "history", "tools", "speed", "voice", "target_language", "sampling",
    "audio_format", "today", "think",
)


def request_from_json(obj: Any, audio: bytes | list[bytes] | None = None) -> GenerationRequest:
    """A GenerationRequest from the wire form (JSON object + optional audio bytes, or a list of clips for a
    conversation with several audio items), validating every field.

    `audio` is a wav (or anything libsndfile reads); raw PCM needs `audio_format` = {"sample_rate": N,
    "dtype": "int16"|"int32"|"float32"}.
    """
    from stepaudio2.audio import decode_audio

    if not isinstance(obj, dict):
        raise InvalidInputError("request must be a JSON object")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidInputError(f"unknown request field(s): {', '.join(unknown)}")
    for name in ("text", "task", "generation", "speed", "voice", "target_language", "today"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise InvalidInputError(f"request field '{name}' must be a string")
    for name in ("messages", "history", "tools"):
        if obj.get(name) is not None and not isinstance(obj[name], list):
            raise InvalidInputError(f"request field '{name}' must be a list")
    sampling = obj.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise InvalidInputError("request field 'sampling' must be an object")
    blobs = [audio] if isinstance(audio, (bytes, bytearray)) else list(audio or [])
    clips = []
    fmt = obj.get("audio_format") or {}
    if not isinstance(fmt, dict):
        raise InvalidInputError("request field 'audio_format' must be an object")
    for k, blob in enumerate(blobs):
        if not blob:
            if len(blobs) > 1:
                raise InvalidInputError(f"audio clip #{k} is empty")
            continue
        wav, sr = decode_audio(blob, pcm_sample_rate=fmt.get("sample_rate"), pcm_dtype=fmt.get("dtype", "int16"))
        clips.append(AudioInput(wav, sr))
    task = obj.get("task")
    return GenerationRequest(
        task=task if task is not None or obj.get("messages") is not None else "chat",
        text=obj.get("text"),
        audios=clips,
        messages=obj.get("messages"),
        generation=obj.get("generation"),
        history=obj.get("history"),
        tools=obj.get("tools"),
        speed=obj.get("speed"),
        voice=obj.get("voice"),
        target_language=obj.get("target_language"),
        today=obj.get("today"),
        think=obj.get("think", False) if obj.get("think") is not None else False,
        sampling=SamplingParams.from_dict(sampling),
    )
