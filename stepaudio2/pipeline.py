"""The in-process reference pipeline: the oracle the served pipeline must match (greedy or seeded).

audio -> 128-mel chunks -> encoder + adaptor -> embeddings spliced at the `<audio_patch>` spans
-> Qwen2 prefill + KV-cached decode -> sampler -> output demultiplexer (text / audio codes / tool calls).
Prompt building, demultiplexing and tool-call parsing come from `stepaudio2.text`, the same code the server uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import Sampler, SamplingParams
from stepaudio2.request import (
    AudioInput,
    GenerationRequest,
    GenerationResult,
    Prompt,
    build_prompt,
    stop_ids,
)

__all__ = ["AudioInput", "GenerationRequest", "GenerationResult", "ReferencePipeline", "load_audio_input"]


class ReferencePipeline:
    """Runs one request at a time on the torch modules of a checkpoint directory."""

    def __init__(
        self, checkpoint_dir: str | Path, engine: str = "torch", repository: str | Path | None = None
    ) -> None:
        from stepaudio2.config import load_config
        from stepaudio2.text import StepAudio2Tokenizer

        self.engine = engine
        self.repository = repository
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = load_config(self.checkpoint_dir)
        self.tokenizer = StepAudio2Tokenizer.from_dir(self.checkpoint_dir)
        self._backend = None

    @property
    def backend(self):  # loaded on first use so prompt-only callers stay light
        if self._backend is None:
            from stepaudio2.engines.llm import make_backend

            self._backend = make_backend(self.checkpoint_dir, self.engine, self.repository)
        return self._backend

    def stop_ids(self, params: SamplingParams) -> set[int]:
        return stop_ids(self.tokenizer, self.config, params)

    def build_prompt(self, request: GenerationRequest) -> Prompt:
        return build_prompt(self.tokenizer, request)

    def prompt_embeddings(self, prompt: Prompt) -> np.ndarray:
        """(T, H) prompt embeddings with the encoded audio spliced in."""
        from stepaudio2.engines.llm import splice_audio

        chunks = self.backend.encode_audio(prompt.mels, prompt.mel_lengths)
        return splice_audio(self.backend.embed(prompt.ids), chunks, prompt.audio_spans)

    # ---- generation ---------------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> Iterator[Any]:
        """Yield demultiplexer events as tokens are decoded, then the GenerationResult as the last item."""
        from stepaudio2.text import OutputDemuxer

        t0 = time.perf_counter()
        params = request.sampling
        prompt = self.build_prompt(request)
        sampler = Sampler(params)
        stops = self.stop_ids(params)
        demux = OutputDemuxer(self.tokenizer.special, self.tokenizer, speech=prompt.generation == "speech")
        backend = self.backend
        logits, state = backend.prefill(self.prompt_embeddings(prompt))
        history = list(prompt.ids)
        generated: list[int] = []
        ttft = 0.0
        finish = "length"
        for step in range(params.max_new_tokens):
            token = sampler(logits, history)
            if step == 0:
                ttft = time.perf_counter() - t0
            generated.append(token)
            history.append(token)
            yield from demux.feed(token)
            if token in stops:
                finish = "stop"
                break
            if step + 1 < params.max_new_tokens:
                logits = backend.decode(state, token)
        yield from demux.finish()
        res = demux.result()
        yield GenerationResult(
            token_ids=generated,
            text=res.text,
            tts_text=res.tts_text,
            audio_codes=list(res.audio_codes),
            tool_calls=[c.to_dict() for c in res.tool_calls],
            finish_reason=finish,
            prompt_tokens=len(prompt.ids),
            time_to_first_token_s=ttft,
            total_s=time.perf_counter() - t0,
            generation=prompt.generation,
            messages=prompt.messages,
        )

    def generate(self, request: GenerationRequest) -> GenerationResult:
        *_, result = self.stream(request)
        return result


def load_audio_input(path: str | Path) -> AudioInput:
    from stepaudio2.audio import load_audio

    wav, sr = load_audio(path)
    return AudioInput(wav, sr)
