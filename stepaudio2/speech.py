"""Speech replies for the reference pipeline: audio codes from the LLM -> 24 kHz wav through token2wav.

Offline: all codes at once after generation. Streaming: codes are pushed as the TA4 stream produces them and
PCM chunks come back as soon as the 25 + 3 chunk rule allows, so the first audio arrives before the reply ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepaudio2.text import AudioCodes


@dataclass
class SpeechChunk:
    """PCM samples (float32, 24 kHz) that became final, and seconds since the stream started."""

    samples: np.ndarray
    at_s: float


class SpeechOutput:
    """token2wav for the reference pipeline. `engine`: "torch" (the checkpoint's modules) or "onnx" (the
    exported token2wav graphs of `repository`, exported on demand like the LLM's: `--engine onnx`); runner
    kinds ("onnx-cpu", "onnx-cuda", "tensorrt") are accepted too."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        voice_wav: str | Path | None = None,
        engine: str = "torch",
        repository: str | Path | None = None,
    ) -> None:
        from stepaudio2.token2wav.prompt import VoicePromptEncoder, default_voice_path
        from stepaudio2.token2wav.synth import Token2Wav

        t2w_dir = Path(checkpoint_dir) / "token2wav"
        if engine == "torch":
            self.token2wav = Token2Wav(t2w_dir)
        else:
            from stepaudio2.export.repository import export_checkpoint

            ckpt = Path(checkpoint_dir)
            # Same default place as the LLM's ONNX backend (stepaudio2.engines.llm.make_backend).
            repo = Path(repository) if repository else ckpt.parent / f"{ckpt.name}-onnx"
            export_checkpoint(ckpt, repo)  # no-op when up to date
            kind = "onnx-cpu" if engine == "onnx" else engine
            self.token2wav = Token2Wav(repo / "token2wav" / "1", engine=kind)
        self.prompt = VoicePromptEncoder(t2w_dir).encode_file(voice_wav or default_voice_path())
        self.sample_rate = self.token2wav.sample_rate

    def offline(self, codes: list[int], seed: int = 0) -> np.ndarray:
        return self.token2wav.offline(codes, self.prompt, seed=seed)

    def stream(self, items: Iterable[Any], seed: int = 0) -> Iterator[Any]:
        """Pass every pipeline item through; after each AudioCodes event, also yield any ready SpeechChunk."""
        t0 = time.perf_counter()
        session = self.token2wav.start_stream(self.prompt, seed=seed)
        for item in items:
            yield item
            if isinstance(item, AudioCodes) and item.codes:
                pcm = self.token2wav.push(session, item.codes)
                if pcm.size:
                    yield SpeechChunk(pcm, time.perf_counter() - t0)
        if session.codes_in:
            yield SpeechChunk(self.token2wav.push(session, [], last=True), time.perf_counter() - t0)
