"""The in-process reference pipeline: the oracle the served pipeline must match (greedy or seeded).

audio -> 128-mel chunks -> encoder + adaptor -> embeddings spliced at the `<audio_patch>` spans
-> Qwen2 prefill + KV-cached decode -> sampler -> output demultiplexer (text / audio codes / tool calls).
Prompt building, demultiplexing and tool-call parsing come from `stepaudio2.text`, the same code the server uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import Sampler, SamplingParams
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
    audio: AudioInput | None = None
    messages: list[dict] | None = None  # explicit chat messages instead of a task preset
    generation: str | None = None  # "text" | "speech" with explicit messages
    history: list[dict] | None = None
    tools: list[dict] | None = None
    speed: str | None = None
    voice: str | None = None
    target_language: str | None = None
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

    def to_json(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "tts_text": self.tts_text,
            "audio_codes": self.audio_codes,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
        }


@dataclass
class Prompt:
    ids: list[int]
    audio_spans: list[tuple[int, int]]
    mels: list[np.ndarray]
    mel_lengths: list[int]
    generation: str
    messages: list[dict]


def _fill_audio_items(messages: list[dict], chunks: list[int] | None) -> list[dict]:
    """Explicit messages mark where the request's audio goes with {"type": "audio"}; fill in its chunk counts."""
    out, used = [], False
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            items = []
            for item in content:
                if isinstance(item, dict) and item.get("type") == "audio" and "chunks" not in item:
                    if chunks is None or used:
                        raise InvalidInputError("a message has an audio item but the request carries no (more) audio")
                    item, used = {"type": "audio", "chunks": list(chunks)}, True
                items.append(item)
            msg = {**msg, "content": items}
        out.append(msg)
    if chunks is not None and not used:
        raise InvalidInputError("the request carries audio but no message has an {'type': 'audio'} item for it")
    return out


def tool_call_dict(call: Any) -> dict[str, Any]:
    out = {"name": call.name, "arguments": call.arguments}
    if getattr(call, "error", None):
        out["error"] = call.error
    return out


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
        sp = self.tokenizer.special
        stops = {sp.eot, sp.endoftext, *params.stop_ids}
        eos = self.config.text.eos_token_id
        stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return stops

    # ---- prompt -------------------------------------------------------------------------------------------
    def build_prompt(self, request: GenerationRequest) -> Prompt:
        from stepaudio2.audio import prepare_audio
        from stepaudio2.text import build_messages, encode_prompt

        mels: list[np.ndarray] = []
        lengths: list[int] = []
        chunks: list[int] | None = None
        if request.audio is not None:
            feats = prepare_audio(request.audio.samples, request.audio.sample_rate)
            mels, lengths, chunks = list(feats.mels), list(feats.valid_lengths), list(feats.placeholder_counts)
        if request.messages is not None:
            messages = _fill_audio_items(request.messages, chunks)
            generation = request.generation or "text"
            if generation not in ("text", "speech"):
                raise InvalidInputError(f"unknown generation mode '{generation}' (text or speech)")
        else:
            if request.task is None:
                raise InvalidInputError("a request needs a 'task' or 'messages'")
            messages, generation = build_messages(
                request.task,
                audio_chunks=chunks,
                text=request.text,
                history=request.history,
                tools=request.tools,
                speed=request.speed,
                voice=request.voice,
                target_language=request.target_language,
            )
        encoded = encode_prompt(self.tokenizer, messages, generation=generation)
        if len(encoded.audio_spans) != len(mels):
            raise InvalidInputError(
                f"prompt has {len(encoded.audio_spans)} audio block(s) but {len(mels)} audio chunk(s) were given"
            )
        return Prompt(encoded.ids, list(encoded.audio_spans), mels, lengths, generation, messages)

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
            tool_calls=[tool_call_dict(c) for c in res.tool_calls],
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
