"""Voice prompt preparation for token2wav (spec §4.1): prompt wav -> S3 tokens, CAM++ x-vector, 24 kHz mel.

- Tokens: the prompt at 16 kHz -> 128-bin log-mel (100 Hz) -> `speech_tokenizer_v2_25hz.onnx` -> codes at
  25 Hz in 0..6560.
- X-vector: 80-bin Kaldi fbank of the 16 kHz prompt minus its mean over time -> `campplus.onnx` -> 192 values.
- Mel: the prompt at 24 kHz -> 80-bin HiFi-GAN-style log-mel (50 Hz), trimmed or padded with copies of its last
  frame to exactly 2 x (number of tokens) frames, so that tokens and mel line up for the flow (upstream 9c378ab).

Multichannel prompts follow upstream: the 16 kHz features use channel 0, the 24 kHz mel the channel mean.

Prompts are cached by content, not by path (spec §7): the key is a sha256 of the sample rate and the float32
samples, so the same audio sent twice (or under two names) is encoded once, and two clips never collide.
Both ONNX models run on onnxruntime (CPU by default; upstream runs CAM++ on the CPU too).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from stepaudio2.audio import (
    campplus_features,
    decode_audio,
    mel_24k_80,
    resample,
    s3_log_mel,
    validate_waveform,
)
from stepaudio2.errors import AudioError, CheckpointError

TOKENIZER_FILE = "speech_tokenizer_v2_25hz.onnx"
CAMPPLUS_FILE = "campplus.onnx"
STANDIN_METADATA_KEY = "stepaudio2_standin"  # set by stepaudio2.token2wav.tiny_hift.write_standin_onnx

MAX_PROMPT_SECONDS = 30.0  # the S3 tokenizer handles at most 30 s in one pass
SILENCE_PEAK = 1e-4  # a prompt whose every sample is below this is treated as silent
TOKEN_RATE = 16_000  # tokenizer and CAM++ input rate
MEL_RATE = 24_000  # prompt-mel rate (the vocoder's)
SPEECH_VOCAB = 6561
XVECTOR_DIM = 192
MEL_BINS = 80
MEL_FRAMES_PER_TOKEN = 2
DEFAULT_CACHE_SIZE = 32

_ASSETS = Path(__file__).resolve().parents[1] / "assets"


def default_voice_path() -> Path:
    """The bundled default prompt clip."""
    return _ASSETS / "default_voice.wav"


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    """Everything the flow needs from one prompt. Arrays are read-only: cached prompts are shared.

    tokens: int64 (T,) S3 codes at 25 Hz; xvector: float32 (192,); mel: float32 (2T, 80) natural-log mel at 50 Hz;
    key: content hash (sha256 hex) of the prompt audio, usable as a cache key downstream.
    """

    tokens: np.ndarray
    xvector: np.ndarray
    mel: np.ndarray
    key: str

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


def fit_mel_to_tokens(mel: np.ndarray, num_tokens: int) -> np.ndarray:
    """(F, bins) mel -> exactly (2 * num_tokens, bins): trim the end, or repeat the last frame."""
    target = MEL_FRAMES_PER_TOKEN * num_tokens
    if mel.shape[0] >= target:
        return mel[:target]
    if mel.shape[0] == 0:
        raise AudioError("voice prompt gives no mel frames")
    pad = np.repeat(mel[-1:], target - mel.shape[0], axis=0)
    return np.concatenate([mel, pad], axis=0)


def content_key(first: np.ndarray, mean: np.ndarray | None, sr: int) -> str:
    """sha256 over the rate and the float32 samples (the channel mean too when it differs from channel 0)."""
    h = hashlib.sha256()
    h.update(f"stepaudio2-voice-prompt-v1:{int(sr)}:{first.size}:".encode())
    h.update(np.ascontiguousarray(first, dtype="<f4").tobytes())
    if mean is not None:
        h.update(b":mean:")
        h.update(np.ascontiguousarray(mean, dtype="<f4").tobytes())
    return h.hexdigest()


def _session(path: Path, providers: Sequence[str] | None, threads: int) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"{path.name}: onnxruntime cannot load it ({exc})") from exc


class VoicePromptEncoder:
    """Turns prompt audio into a VoicePrompt with the token2wav ONNX front ends; bounded LRU cache by content.

    Thread-safe: onnxruntime sessions may be run concurrently, and the cache is guarded by a lock.
    """

    def __init__(
        self,
        token2wav_dir: str | Path,
        cache_size: int = DEFAULT_CACHE_SIZE,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        root = Path(token2wav_dir)
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._tokenizer = _session(root / TOKENIZER_FILE, providers, intra_op_threads)
        self._campplus = _session(root / CAMPPLUS_FILE, providers, intra_op_threads)
        self._tok_feats, self._tok_len = self._tokenizer_inputs()
        self._camp_input = self._campplus.get_inputs()[0].name  # upstream feeds it by position too
        self.is_standin = any(
            s.get_modelmeta().custom_metadata_map.get(STANDIN_METADATA_KEY) == "1"
            for s in (self._tokenizer, self._campplus)
        )
        self._cache_size = cache_size
        self._cache: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def _tokenizer_inputs(self) -> tuple[str, str]:
        inputs = self._tokenizer.get_inputs()
        if len(inputs) != 2:
            names = [i.name for i in inputs]
            raise CheckpointError(f"{TOKENIZER_FILE}: expected inputs (feats, feats_length), found {names}")
        names = {i.name for i in inputs}
        # The released graph names them feats / feats_length; otherwise go by position as upstream does.
        if {"feats", "feats_length"} <= names:
            return "feats", "feats_length"
        return inputs[0].name, inputs[1].name

    # ---- public API ------------------------------------------------------------------------------------------

    def encode(self, wav: np.ndarray, sr: int) -> VoicePrompt:
        """Prompt samples (1-D, or (frames, channels)) in [-1, 1] at `sr` Hz -> VoicePrompt.

        Raises AudioError for an empty, silent, non-finite or over-30 s prompt, or one too short to give a token.
        """
        arr = np.asarray(wav)
        if arr.ndim == 2:
            if arr.shape[1] == 0:
                raise AudioError("voice prompt has no channels")
            first, mean = arr[:, 0], arr.mean(axis=1)
            if np.array_equal(first, mean):
                mean = None  # mono in a 2-D array: same key as the 1-D clip
        elif arr.ndim == 1:
            first, mean = arr, None
        else:
            raise AudioError(f"voice prompt must be 1-D or (frames, channels), got shape {arr.shape}")
        return self._encode(first, mean, sr)

    def encode_file(self, path: str | Path) -> VoicePrompt:
        """Read a prompt file (anything libsndfile reads) and encode it."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise AudioError(f"could not read voice prompt '{p}': {exc.strerror or exc}") from exc
        return self.encode_bytes(data)

    def encode_bytes(self, data: bytes) -> VoicePrompt:
        """Encode a prompt from the bytes of an audio file (wav, flac, ...), as a server receives it."""
        if not data:
            raise AudioError("voice prompt is empty")
        try:
            first, sr = decode_audio(data, mono="first")
            mean, _ = decode_audio(data, mono="mean")
        except AudioError as exc:
            raise AudioError(f"voice prompt: {exc}") from None
        return self._encode(first, None if np.array_equal(first, mean) else mean, sr)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    # ---- internals -------------------------------------------------------------------------------------------

    def _encode(self, first: np.ndarray, mean: np.ndarray | None, sr: int) -> VoicePrompt:
        first = self._validate(first, sr)
        if mean is not None:
            mean = self._validate(mean, sr)
        key = content_key(first, mean, sr)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return hit
            self._misses += 1
        prompt = self._compute(first, first if mean is None else mean, sr, key)
        if self._cache_size:
            with self._lock:
                self._cache[key] = prompt
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return prompt

    @staticmethod
    def _validate(wav: np.ndarray, sr: int) -> np.ndarray:
        arr = np.asarray(wav)
        if arr.size == 0:
            raise AudioError("voice prompt is empty")
        try:
            arr = validate_waveform(arr, sr)
        except AudioError as exc:
            raise AudioError(f"voice prompt: {exc}") from None
        seconds = arr.size / sr
        if seconds > MAX_PROMPT_SECONDS:
            raise AudioError(
                f"voice prompt is {seconds:.1f} s long, more than the {MAX_PROMPT_SECONDS:g} s limit (3-10 s is typical)"
            )
        peak = float(np.max(np.abs(arr)))
        if peak < SILENCE_PEAK:
            raise AudioError(f"voice prompt is silent (peak amplitude {peak:.2e} < {SILENCE_PEAK:g})")
        return arr

    def _compute(self, wav_first: np.ndarray, wav_mean: np.ndarray, sr: int, key: str) -> VoicePrompt:
        try:
            wav16 = resample(wav_first, sr, TOKEN_RATE)
            tokens = self._tokens(s3_log_mel(wav16))
            xvector = self._xvector(campplus_features(wav16))
            mel = mel_24k_80(resample(wav_mean, sr, MEL_RATE)).T  # (frames, 80)
        except AudioError as exc:
            raise AudioError(f"voice prompt: {exc}") from None
        mel = fit_mel_to_tokens(np.asarray(mel, dtype=np.float32), tokens.size)
        return VoicePrompt(
            tokens=_readonly(tokens),
            xvector=_readonly(xvector),
            mel=_readonly(mel.astype(np.float32, copy=False)),
            key=key,
        )

    def _tokens(self, log_mel: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(log_mel[None], dtype=np.float32)  # (1, 128, F)
        length = np.array([feats.shape[2]], dtype=np.int32)
        out = self._tokenizer.run(None, {self._tok_feats: feats, self._tok_len: length})[0]
        codes = np.asarray(out).reshape(-1)
        if codes.dtype.kind not in "iu":
            raise CheckpointError(f"{TOKENIZER_FILE}: output has dtype {codes.dtype}, expected integer codes")
        codes = codes.astype(np.int64)
        bad = codes[(codes < 0) | (codes >= SPEECH_VOCAB)]
        if bad.size:
            raise CheckpointError(f"{TOKENIZER_FILE}: emitted code {int(bad[0])} outside 0..{SPEECH_VOCAB - 1}")
        if codes.size == 0:
            raise AudioError("voice prompt is too short to give a speech token")
        return codes

    def _xvector(self, fbank: np.ndarray) -> np.ndarray:
        if fbank.shape[0] == 0:
            raise AudioError("voice prompt is too short for the speaker embedding (needs >= 25 ms)")
        feats = np.ascontiguousarray(fbank[None], dtype=np.float32)  # (1, T, 80)
        out = np.asarray(self._campplus.run(None, {self._camp_input: feats})[0], dtype=np.float32).reshape(-1)
        if out.size != XVECTOR_DIM:
            raise CheckpointError(f"{CAMPPLUS_FILE}: output has {out.size} values, expected {XVECTOR_DIM}")
        if not np.isfinite(out).all():
            raise AudioError("voice prompt gives a non-finite speaker embedding")
        return out
