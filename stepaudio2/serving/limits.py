"""Per-request limits of the public models (`pipeline`, `generate`), checked before any work is done.

Every limit is a `parameters` entry of the model's config.pbtxt (names below), documented in the README, and a
request over one gets InvalidInputError naming it. Why: nothing else bounded one request's work; a 1 MB text
made the runtime try to allocate terabytes, a 100k-deep JSON overflowed the parser's stack (INTERNAL), a
600 s wav held gigabytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields
from typing import Any

from stepaudio2.errors import InvalidInputError


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 1 << 20  # the `request` JSON tensor
    max_json_depth: int = 32  # nesting of the request JSON
    max_audio_bytes: int = 64 << 20  # the `audio` (and `voice`) tensors
    max_audio_seconds: float = 600.0  # all audio of one request
    max_text_chars: int = 32_000  # all strings of the request together
    max_new_tokens: int = 4096

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> RequestLimits:
        """From a config.pbtxt `parameters` dict; absent keys keep their defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in params:
                values[f.name] = (float if f.type in ("float", float) else int)(params[f.name])
        return cls(**values)


def _depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings skipped (runs before the recursive parser)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_request(raw: bytes | None, limits: RequestLimits) -> Any:
    """The request JSON, after its size and nesting are checked."""
    if raw is None:
        return None
    if len(raw) > limits.max_request_bytes:
        raise InvalidInputError(
            f"request JSON is {len(raw)} bytes, over the limit max_request_bytes={limits.max_request_bytes}")
    if _depth(raw) > limits.max_json_depth:
        raise InvalidInputError(f"request JSON nests deeper than the limit max_json_depth={limits.max_json_depth}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"input 'request' is not valid UTF-8 JSON: {exc}") from exc


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())  # values only: keys are bounded by the schema
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


def audio_seconds(data: bytes, audio_format: Any = None) -> float | None:
    """Duration from the header alone (no decoding): raw PCM from its declared format, files via soundfile.
    None when it cannot be told cheaply (the decoder's own checks then apply)."""
    if isinstance(audio_format, dict):
        rate = audio_format.get("sample_rate")
        width = {"int16": 2, "float32": 4, "int32": 4}.get(audio_format.get("dtype", "int16"))
        if isinstance(rate, int) and rate > 0 and width:
            return len(data) / (rate * width)
        return None
    try:
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        return info.frames / info.samplerate if info.samplerate else None
    except Exception:  # not a container soundfile reads: leave it to the decoder
        return None


AUDIO_FORMAT_KEYS = ("sample_rate", "dtype")


def wav_truncated(data: bytes) -> bool:
    """A RIFF/WAVE file whose `data` chunk declares more bytes than the file holds (a cut-off upload would
    otherwise decode to its first milliseconds and be answered)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"data":
            return size != 0xFFFFFFFF and pos + 8 + size > len(data)  # 0xFFFFFFFF: streaming writers
        pos += 8 + size + (size & 1)
    return True  # no data chunk inside the bytes given


def check_request(obj: Any, audio: bytes | list[bytes] | None, voice: bytes | None, limits: RequestLimits) -> None:
    """Size limits of one parsed request and its audio tensors (`audio`: one clip or the request's list of clips;
    the byte and duration limits cover all clips together)."""
    clips = [audio] if isinstance(audio, (bytes, bytearray)) else [a for a in (audio or []) if a]
    total = sum(len(c) for c in clips)
    for name, size in (("audio", total if clips else None), ("voice", None if voice is None else len(voice))):
        if size is not None and size > limits.max_audio_bytes:
            raise InvalidInputError(
                f"input '{name}' is {size} bytes, over the limit max_audio_bytes={limits.max_audio_bytes}")
    if not isinstance(obj, dict):
        return  # the request parser names that problem
    chars = _text_chars(obj)
    if chars > limits.max_text_chars:
        raise InvalidInputError(f"request text is {chars} characters, over the limit "
                                f"max_text_chars={limits.max_text_chars}")
    sampling = obj.get("sampling")
    if isinstance(sampling, dict):
        n = sampling.get("max_new_tokens")
        if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_new_tokens:
            raise InvalidInputError(
                f"sampling 'max_new_tokens'={n} is over the limit max_new_tokens={limits.max_new_tokens}")
    fmt = obj.get("audio_format")
    if isinstance(fmt, dict):
        unknown = sorted(str(k) for k in fmt if k not in AUDIO_FORMAT_KEYS)
        if unknown:
            raise InvalidInputError(f"unknown 'audio_format' key(s): {', '.join(unknown)} "
                                    f"(known: {', '.join(AUDIO_FORMAT_KEYS)})")
    seconds = 0.0
    for i, clip in enumerate(clips):
        name = "input 'audio'" if len(clips) == 1 else f"input 'audio' clip {i}"
        if fmt is None and wav_truncated(clip):
            raise InvalidInputError(f"{name} is a truncated wav: its data chunk is longer than the bytes sent")
        seconds += audio_seconds(clip, fmt) or 0.0
    if seconds > limits.max_audio_seconds:
        raise InvalidInputError(f"audio is {seconds:.1f} s long, over the limit "
                                f"max_audio_seconds={limits.max_audio_seconds:g}")
