"""One served request end to end, shared by the streaming `pipeline` and the request/response `generate` models:
serving options and server-held sessions, the core `run_pipeline` flow over BLS stages, speech routing to
token2wav, and the wire events. Torch-free; pb_utils stays in the adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from stepaudio2.errors import InvalidInputError
from stepaudio2.pipeline import GenerationResult, run_pipeline
from stepaudio2.request import request_from_json
from stepaudio2.serving.bls import BlsStages
from stepaudio2.serving.events import EventCoalescer, event_dict
from stepaudio2.serving.sessions import SessionStore
from stepaudio2.serving.speech_route import SpeechOptions, SpeechRoute
from stepaudio2.text import AudioCodes, ToolCallEvent, get_task

Emit = Callable[[dict[str, Any], np.ndarray | None], None]  # (event, PCM chunk or None)


def serve_request(
    tokenizer: Any,
    stages: BlsStages,
    obj: Any,
    audio: bytes | list[bytes] | None,
    voice_audio: bytes | None,
    emit: Emit,
    *,
    is_cancelled: Callable[[], bool],
    sessions: SessionStore | None,
    arrived: float | None = None,
    speech_default: str = "stream",
    on_tool_call: Callable[[str], None] | None = None,
    on_audio_done: Callable[[SpeechRoute], None] | None = None,
) -> dict[str, Any]:
    """Run one request; every event goes to `emit` (the result last). Returns the result payload."""
    arrived = time.perf_counter() if arrived is None else arrived
    audio = [audio] if isinstance(audio, (bytes, bytearray)) else [a for a in (audio or []) if a]
    if not isinstance(obj, dict):
        raise InvalidInputError("request must be a JSON object")
    obj = dict(obj)
    obj.setdefault("speech_output", speech_default)
    options = SpeechOptions.pop_from(obj)
    session_id = obj.pop("session_id", None)
    lease = None
    if session_id is not None:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInputError("request field 'session_id' must be \"new\" or an id from an earlier result")
        if sessions is None:
            raise InvalidInputError("this server does not hold sessions")
        lease = sessions.begin(session_id)  # held until the reply is stored: one request per session at a time
    try:
        if lease is not None:
            obj, audio = sessions.continue_request(lease, obj, audio)
            if options.voice_id is None and voice_audio is None:  # keep speaking in the session's voice
                options.voice_id = lease.state.get("voice_id")
        payload = _serve(tokenizer, stages, obj, audio, voice_audio, emit, options, is_cancelled, arrived,
                         on_tool_call, on_audio_done)
        if session_id is not None:
            spoken = payload.get("audio") or {}
            voice_id = options.voice_id or (spoken.get("voice_id") if voice_audio else None)
            payload["session_id"] = sessions.save(
                lease, [*payload["messages"], payload["assistant_turn"]], payload["generation"], audio, voice_id
            )
    finally:
        if sessions is not None:
            sessions.end(lease)
    emit(payload, None)
    return payload


def _serve(tokenizer, stages, obj, audio, voice_audio, emit, options, is_cancelled, arrived, on_tool_call,
           on_audio_done) -> dict[str, Any]:
    """The reply itself (every event but the result, which is returned)."""
    req = request_from_json(obj, audio)
    if voice_audio is not None and not voice_audio:
        raise InvalidInputError("voice prompt audio is empty")
    if (req.generation if req.messages is not None else get_task(req.task or "").output) != "speech":
        options.output = "none"  # a text reply is never spoken, even if stray audio tokens appear in it
    speech = SpeechRoute(stages, options, voice_audio, lambda event, pcm: emit(event, pcm), arrived)
    flow = run_pipeline(tokenizer, req, stages.encode, stages.generator(is_cancelled))
    events = EventCoalescer(lambda payload: emit(payload, None))
    try:
        for item in flow:
            if isinstance(item, GenerationResult):
                result = item
                break
            if isinstance(item, AudioCodes):
                events.flush()  # keep text before the PCM this push may send
                speech.feed(list(item.codes))
            if isinstance(item, ToolCallEvent) and on_tool_call is not None:
                on_tool_call(item.call.name)
            payload = event_dict(item)
            if payload is not None:
                events.add(payload)
            if stages.at_response_end:  # the llm's next response is not here yet: send what we have
                events.flush()
        events.flush()
        audio_summary = speech.finish()
    except BaseException:
        speech.cancel()
        raise
    if audio_summary is not None and on_audio_done is not None:
        on_audio_done(speech)
    return {"type": "result", **result.to_json(), "audio": audio_summary}

