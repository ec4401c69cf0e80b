"""SpeechRoute's calls to the speech stages, in order: when the voice prompt is fetched, when chunks are pushed.
(The served audio itself is checked against the reference pipeline in tests/test_serving_speech.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.speech_route import FIRST_CHUNK_CODES, NEXT_CHUNK_CODES, SpeechOptions, SpeechRoute


class RecordingStages:
    """Speech stages that log each call and answer one sample per code."""

    def __init__(self, unknown_voice: bool = False) -> None:
        self.calls: list[tuple] = []
        self.unknown_voice = unknown_voice

    def voice(self, audio, voice_id):
        self.calls.append(("voice", voice_id))
        if self.unknown_voice:
            raise InvalidInputError(f"unknown voice_id '{voice_id}'")
        return {"voice_id": np.array([b"v1"], dtype=np.object_)}

    def speech_open(self, prompt, seed, codes, last):
        self.calls.append(("open", len(codes), last))
        return "s1", np.zeros(len(codes), np.float32)

    def speech_push(self, stream_id, codes, last):
        self.calls.append(("push", len(codes), last))
        return np.zeros(len(codes), np.float32)

    def speech_cancel(self, stream_id):
        self.calls.append(("cancel", stream_id))

    def speech_offline(self, codes, prompt, seed):
        self.calls.append(("offline", len(codes)))
        return np.zeros(len(codes), np.float32)


def _route(stages: RecordingStages, output: str = "stream", voice_id: str | None = None) -> tuple[SpeechRoute, list]:
    sent: list = []
    return SpeechRoute(stages, SpeechOptions(output, voice_id), None, lambda e, pcm: sent.append(e), 0.0), sent


def test_the_voice_prompt_is_fetched_with_the_first_codes_before_the_first_chunk_is_due() -> None:
    stages = RecordingStages()
    route, sent = _route(stages, voice_id="v1")
    route.feed([1, 2])
    assert stages.calls == [("voice", "v1")]  # fetched now, while the LLM goes on to the 28th code
    route.feed([3] * (FIRST_CHUNK_CODES - 2))
    route.feed([4] * NEXT_CHUNK_CODES)
    route.feed([5] * 3)
    summary = route.finish()
    assert stages.calls == [("voice", "v1"), ("open", FIRST_CHUNK_CODES, False), ("push", NEXT_CHUNK_CODES, False),
                            ("push", 3, True)]  # one voice call for the whole reply
    assert [e["samples"] for e in sent] == [FIRST_CHUNK_CODES, NEXT_CHUNK_CODES, 3]
    assert summary["voice_id"] == "v1" and summary["codes"] == FIRST_CHUNK_CODES + NEXT_CHUNK_CODES + 3


def test_offline_fetches_the_voice_early_too_and_synthesises_once_at_the_end() -> None:
    stages = RecordingStages()
    route, _ = _route(stages, output="offline")
    route.feed([1] * 40)
    assert stages.calls == [("voice", None)]
    route.finish()
    assert stages.calls == [("voice", None), ("offline", 40)]


def test_no_speech_output_or_no_codes_never_calls_a_speech_stage() -> None:
    stages = RecordingStages()
    route, _ = _route(stages, output="none")
    route.feed([1] * 60)
    assert route.finish() is None
    route, _ = _route(stages)
    route.feed([])
    assert route.finish() is None
    assert stages.calls == []


def test_an_unknown_voice_fails_at_the_first_codes() -> None:
    stages = RecordingStages(unknown_voice=True)
    route, sent = _route(stages, voice_id="nope")
    with pytest.raises(InvalidInputError, match="unknown voice_id 'nope'"):
        route.feed([1])
    assert sent == [] and stages.calls == [("voice", "nope")]
