"""Input checks the internal models share, so every stage refuses bad input itself (they are reachable on the
server's port) with InvalidInputError naming the field or limit, before the input can reach a batch.

Why here: one NaN row or a too-long mel inside a dynamic batch or a decode step fails or poisons every other
request in it; checking per request, before batching, keeps a bad request's failure its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stepaudio2.errors import InvalidInputError


@dataclass(frozen=True)
class LLMLimits:
    vocab_size: int
    hidden_size: int
    context: int  # max_position_embeddings: prompt + generated tokens must fit
    max_prompt_tokens: int | None = None  # configurable cap below the context (None: the context)


@dataclass(frozen=True)
class LLMInputs:
    ids: np.ndarray  # int64 [L]
    chunks: list[np.ndarray]  # float32 [n_k, hidden] per span
    spans: list[tuple[int, int]]  # (start in ids, length)


def _int_array(value: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"'{name}' must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def check_llm_inputs(
    input_ids: np.ndarray | None,
    audio_embeds: np.ndarray | None,
    audio_spans: np.ndarray | None,
    limits: LLMLimits,
    max_new_tokens: int | None = None,
) -> LLMInputs:
    """Validate one raw `llm` request: token ids in range, prompt within the limits, embeddings [N, hidden] and
    finite, spans inside the prompt and covering every embedding row. Returns the parsed pieces."""
    if input_ids is None:
        raise InvalidInputError("missing input tensor 'input_ids'")
    ids = _int_array(input_ids, "input_ids").reshape(-1)
    if ids.size == 0:
        raise InvalidInputError("'input_ids' is empty")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise InvalidInputError(f"'input_ids' has ids outside [0, {limits.vocab_size})")
    cap = limits.context if limits.max_prompt_tokens is None else min(limits.max_prompt_tokens, limits.context)
    if ids.size > cap:
        raise InvalidInputError(f"prompt is {ids.size} tokens, over the limit max_prompt_tokens={cap}")
    if max_new_tokens is not None and ids.size + max_new_tokens > limits.context:
        raise InvalidInputError(
            f"prompt ({ids.size} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {limits.context}")
    spans: list[tuple[int, int]] = []
    chunks: list[np.ndarray] = []
    has_spans = audio_spans is not None and np.asarray(audio_spans).size > 0
    if audio_embeds is not None and np.asarray(audio_embeds).size > 0 and not has_spans:
        raise InvalidInputError("'audio_embeds' given without 'audio_spans'")
    if has_spans:
        raw = _int_array(audio_spans, "audio_spans")
        if raw.ndim != 2 or raw.shape[1] != 2:
            raise InvalidInputError(f"'audio_spans' must be [K, 2] (start, length), got {list(raw.shape)}")
        spans = [(int(a), int(b)) for a, b in raw]
        # A clip of <= 320 samples is an empty block (`<audio_start><audio_end>`): a 0-length span, 0 rows.
        if audio_embeds is None and any(b for _, b in spans):
            raise InvalidInputError("'audio_spans' given without 'audio_embeds'")
        embeds = np.zeros((0, limits.hidden_size), np.float32) if audio_embeds is None else np.asarray(audio_embeds)
        if embeds.ndim != 2 or embeds.shape[1] != limits.hidden_size:
            raise InvalidInputError(
                f"'audio_embeds' must be [N, {limits.hidden_size}] (the LLM width), got {list(embeds.shape)}")
        if embeds.dtype.kind != "f":
            raise InvalidInputError(f"'audio_embeds' must be floating point, got {embeds.dtype}")
        if not np.isfinite(embeds).all():
            raise InvalidInputError("'audio_embeds' contains NaN or infinite values")
        end = 0
        for a, b in sorted(spans):
            if a < end or b < 0 or a + b > ids.size:
                raise InvalidInputError("'audio_spans' must be non-negative, non-overlapping and inside 'input_ids'")
            end = a + b
        if sum(b for _, b in spans) != embeds.shape[0]:
            raise InvalidInputError("'audio_spans' lengths do not add up to the rows of 'audio_embeds'")
        offsets = np.cumsum([0] + [b for _, b in spans])
        chunks = [embeds[offsets[k] : offsets[k + 1]].astype(np.float32) for k in range(len(spans))]
    return LLMInputs(ids=ids, chunks=chunks, spans=spans)


def check_mel(mel: np.ndarray, length: int, n_mels: int, max_frames: int) -> None:
    """One audio_encoder item: [1, n_mels, T] finite, 1 <= length <= T, T within the encoder's window."""
    if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != n_mels:
        raise InvalidInputError(f"'mel' must be [1, {n_mels}, frames], got {list(mel.shape)}")
    if mel.shape[2] > max_frames:
        raise InvalidInputError(
            f"'mel' has {mel.shape[2]} frames, over the limit max_mel_frames={max_frames} (one 30 s chunk)")
    if not 1 <= length <= mel.shape[2]:
        raise InvalidInputError(f"'mel_length' {length} is outside [1, {mel.shape[2]}]")
    if not np.isfinite(mel).all():
        raise InvalidInputError("'mel' contains NaN or infinite values")


def check_prompt_features(tokens: np.ndarray, mel: np.ndarray, xvector: np.ndarray, *, speech_vocab: int,
                          xvector_dim: int, mel_bins: int) -> None:
    """token2wav prompt features: S3 tokens in [0, speech_vocab), mel [2 x tokens, mel_bins], x-vector of the
    speaker model's width, all finite."""
    if tokens.size == 0:
        raise InvalidInputError("'prompt_tokens' is empty")
    if tokens.min() < 0 or tokens.max() >= speech_vocab:
        raise InvalidInputError(f"'prompt_tokens' has tokens outside [0, {speech_vocab})")
    if mel.ndim != 2 or mel.shape != (2 * tokens.size, mel_bins):
        raise InvalidInputError(
            f"'prompt_mel' must be [2 x {tokens.size} prompt tokens, {mel_bins}], got {list(mel.shape)}")
    if xvector.size != xvector_dim:
        raise InvalidInputError(f"'prompt_xvector' must have {xvector_dim} values, got {xvector.size}")
    if not (np.isfinite(mel).all() and np.isfinite(xvector).all()):
        raise InvalidInputError("'prompt_mel' / 'prompt_xvector' contain NaN or infinite values")
