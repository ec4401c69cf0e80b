"""Speech routing of the streaming pipeline: the audio codes of a reply go to token2wav as they arrive, and
24 kHz PCM chunks go back to the client as soon as each is ready, while text deltas keep flowing.

One `SpeechRoute` per reply, on the pipeline's thread: `feed` takes each AudioCodes event; when the 25 + 3 chunk
rule makes a chunk due it opens the token2wav stream (first time), pushes the new codes and sends the PCM. The
LLM keeps generating meanwhile (its tokens wait in the BLS stream), so a chunk costs the text deltas after it one
synthesis call of delay. The voice prompt is fetched when the first codes arrive, and the stream opens with its
first chunk (token2wav op "start" with codes): one call, so the first audio waits for one token2wav queue, not
two, and not for the voice_prompt call. `finish` pushes the end of the stream and returns the audio
summary of the result; `cancel` releases the server-side stream. (A worker thread would overlap the two, but
several threads talking to the server from one stub crashed this Triton version's Python backend.)
Modes: "stream" (chunks as they are ready), "offline" (one synthesis of the whole reply at the end), "none".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stepaudio2.errors import InvalidInputError

SAMPLE_RATE = 24000
FIRST_CHUNK_CODES = 28  # 25 + 3 lookahead codes: the first chunk is due
NEXT_CHUNK_CODES = 25
SPEECH_OUTPUTS = ("stream", "offline", "none")


class SpeechStages(Protocol):
    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]: ...
    def speech_open(self, prompt: dict[str, np.ndarray], seed: int, codes: list[int], last: bool
                    ) -> tuple[str, np.ndarray]: ...
    def speech_push(self, stream_id: str, codes: list[int], last: bool) -> np.ndarray: ...
    def speech_cancel(self, stream_id: str) -> None: ...
    def speech_offline(self, codes: list[int], prompt: dict[str, np.ndarray], seed: int) -> np.ndarray: ...


@dataclass
class SpeechOptions:
    """Serving options of a request (besides the generation request itself)."""

    output: str = "stream"
    voice_id: str | None = None
    seed: int = 0

    @classmethod
    def pop_from(cls, obj: dict) -> SpeechOptions:
        """Take `speech_output`, `voice_id`, `speech_seed` out of a request object (validated)."""
        out = obj.pop("speech_output", "stream")
        if out not in SPEECH_OUTPUTS:
            raise InvalidInputError(f"request field 'speech_output' must be one of {', '.join(SPEECH_OUTPUTS)}")
        voice_id = obj.pop("voice_id", None)
        if voice_id is not None and (not isinstance(voice_id, str) or not voice_id):
            raise InvalidInputError("request field 'voice_id' must be a non-empty string")
        seed = obj.pop("speech_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InvalidInputError("request field 'speech_seed' must be a non-negative integer")
        return cls(out, voice_id, seed)


class DeliveryClock:
    """Listener's view of a stream: time to first audio, gaps, and underruns (a chunk arriving after the audio
    sent before it would have finished playing, when playback starts at the first chunk)."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.play_until = 0.0
        self.underruns = 0
        self.gaps: list[float] = []

    def chunk(self, seconds: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_at is None:
            self.first_at, self.play_until = now, now
        else:
            self.gaps.append(now - self.last_at)
            if now > self.play_until:
                self.underruns += 1
        self.play_until = max(self.play_until, now) + seconds
        self.last_at = now

    @property
    def time_to_first_audio(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.arrived


Send = Callable[[dict[str, Any], np.ndarray], None]  # (audio event, PCM chunk)


class SpeechRoute:
    def __init__(
        self, stages: SpeechStages, options: SpeechOptions, voice_audio: bytes | None, send: Send, arrived: float
    ) -> None:
        self.stages = stages
        self.options = options
        self.voice_audio = voice_audio
        self.send = send
        self.clock = DeliveryClock(arrived)
        self.codes: list[int] = []
        self.submitted = 0  # codes already pushed to token2wav
        self.next_due = FIRST_CHUNK_CODES
        self.samples = 0
        self.chunks = 0
        self.stream_id: str | None = None
        self.prompt: dict[str, np.ndarray] | None = None
        self._cancelled = False

    # ---- pipeline thread ----------------------------------------------------------------------------------------

    def feed(self, codes: list[int]) -> None:
        if self.options.output == "none" or not codes:
            return
        # The voice prompt is fetched with the first codes, while the LLM goes on to the first chunk's 28th
        # code, so the first chunk does not wait for that call too (over gRPC on a split, one more hop).
        self._ensure_prompt()
        self.codes.extend(codes)
        if self.options.output == "stream" and len(self.codes) >= self.next_due:
            while len(self.codes) >= self.next_due:
                self.next_due += NEXT_CHUNK_CODES
            self._submit(last=False)

    def finish(self) -> dict[str, Any] | None:
        """End of the reply: synthesise what is left, wait for it, and return the audio summary (None: no audio)."""
        if self.options.output == "none" or not self.codes:
            return None
        if self.options.output == "offline":
            self._ensure_prompt()
            pcm = self.stages.speech_offline(self.codes, self.prompt, self.options.seed)
            self._deliver(pcm)
        else:
            self._submit(last=True)
        ttfa = self.clock.time_to_first_audio
        return {
            "sample_rate": SAMPLE_RATE, "samples": self.samples, "seconds": self.samples / SAMPLE_RATE,
            "chunks": self.chunks, "codes": len(self.codes), "underruns": self.clock.underruns,
            "time_to_first_audio_s": ttfa, "voice_id": self._voice_id(),
        }

    def cancel(self) -> None:
        """The client left (or the reply failed): release the token2wav stream."""
        self._cancelled = True
        if self.stream_id is not None:
            stream_id, self.stream_id = self.stream_id, None
            self.stages.speech_cancel(stream_id)

    def _submit(self, last: bool) -> None:
        codes, self.submitted = self.codes[self.submitted :], len(self.codes)
        if self.stream_id is None:  # the stream opens with its first chunk: one token2wav call, not two
            self._ensure_prompt()
            self.stream_id, pcm = self.stages.speech_open(self.prompt, self.options.seed, codes, last)
        else:
            pcm = self.stages.speech_push(self.stream_id, codes, last)
        self._deliver(pcm)
        if last:
            self.stream_id = None  # token2wav released it with the last chunk

    def _ensure_prompt(self) -> None:
        if self.prompt is None:
            self.prompt = self.stages.voice(self.voice_audio, self.options.voice_id)

    def _voice_id(self) -> str | None:
        return None if self.prompt is None else bytes(self.prompt["voice_id"].reshape(-1)[0]).decode()

    def _deliver(self, pcm: np.ndarray) -> None:
        if pcm.size == 0 or self._cancelled:
            return
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        seconds = pcm.size / SAMPLE_RATE
        self.clock.chunk(seconds)
        event = {"type": "audio", "sample_rate": SAMPLE_RATE, "offset": self.samples, "samples": int(pcm.size)}
        self.samples += pcm.size
        self.chunks += 1
        self.send(event, pcm)
