"""The in-process reference pipeline: the oracle the served pipeline must match (greedy or seeded).

audio -> 128-mel chunks -> encoder + adaptor -> embeddings spliced at the `<audio_patch>` spans
-> Qwen2 prefill + KV-cached decode -> sampler -> output demultiplexer (text / audio codes / tool calls).
Prompt building, demultiplexing and tool-call parsing come from `stepaudio2.text`, the same code the server uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
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
from stepaudio2.text import OutputDemuxer, assistant_turn_from_reply

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

    def generate_tokens(
        self, ids: list[int], audio_chunks: list[np.ndarray], spans: list[tuple[int, int]], params: SamplingParams
    ) -> Iterator[int | str]:
        """The single-request decode loop: yields token ids, then the finish reason ("stop" | "length")."""
        from stepaudio2.engines.llm import splice_audio

        backend = self.backend
        logits, state = backend.prefill(splice_audio(backend.embed(ids), audio_chunks, spans))
        sampler, stops, history = Sampler(params), self.stop_ids(params), list(ids)
        for step in range(params.max_new_tokens):
            token = sampler(logits, history)
            history.append(token)
            yield token
            if token in stops:
                yield "stop"
                return
            if step + 1 < params.max_new_tokens:
                logits = backend.decode(state, token)
        yield "length"

    def stream(self, request: GenerationRequest) -> Iterator[Any]:
        """Yield demultiplexer events as tokens are decoded, then the GenerationResult as the last item."""
        return run_pipeline(self.tokenizer, request, self.backend.encode_audio, self.generate_tokens)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        *_, result = self.stream(request)
        return result


# encode(mels, valid lengths) -> one (N_k, H) array per chunk
EncodeFn = Callable[[list[np.ndarray], list[int]], list[np.ndarray]]
# generate(ids, audio chunks, spans, sampling) -> token ids, then the finish reason as a str
GenerateFn = Callable[[list[int], list[np.ndarray], list[tuple[int, int]], SamplingParams], Iterable[int | str]]


def run_pipeline(tokenizer: Any, request: GenerationRequest, encode: EncodeFn, generate: GenerateFn) -> Iterator[Any]:
    """prompt -> audio encoder -> token stream -> demultiplexed events, then a GenerationResult.

    The one generation flow of the project: the reference pipeline passes in-process engines, the served
    pipeline (ensemble/pipeline) passes callables that reach the audio_encoder and llm stages over BLS.
    """
    t0 = time.perf_counter()
    prompt = build_prompt(tokenizer, request)
    chunks = encode(prompt.mels, prompt.mel_lengths) if prompt.mels else []
    # Think mode: the prompt ends with <think>\n, so even a spoken answer starts in text (the model opens it).
    demux = OutputDemuxer(tokenizer.special, tokenizer, speech=prompt.generation == "speech" and not prompt.think,
                          think=prompt.think)
    generated: list[int] = []
    finish, ttft = "length", 0.0
    for item in generate(prompt.ids, chunks, prompt.audio_spans, request.sampling):
        if isinstance(item, str):
            finish = item
            break
        if not generated:
            ttft = time.perf_counter() - t0
        generated.append(item)
        yield from demux.feed(item)
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
        assistant_turn=assistant_turn_from_reply(
            prompt.generation, _answer_ids(generated, res, tokenizer.special) if prompt.think else generated,
            res.text, special=tokenizer.special, tool_calls=res.tool_calls,
        ),
        reasoning=res.reasoning if prompt.think else None,
    )


def _answer_ids(generated: list[int], res: Any, special: Any) -> list[int]:
    """Think mode: the history keeps the answer only (upstream drops the reasoning), i.e. the ids after
    `</think>`, and for a spoken answer the ids after the model's own `<tts_start>` (the replay adds one)."""
    ids = generated[res.answer_start :]
    if special.tts_start in ids:
        ids = ids[ids.index(special.tts_start) + 1 :]
    return ids


def load_audio_input(path: str | Path) -> AudioInput:
    from stepaudio2.audio import load_audio

    wav, sr = load_audio(path)
    return AudioInput(wav, sr)
