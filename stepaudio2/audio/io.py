"""Decoding, validation and encoding of waveforms (numpy + soundfile only).

Every waveform handed to the rest of the package is a 1-D, C-contiguous float32 array in roughly
[-1, 1] plus an integer sample rate. Multichannel input is reduced to channel 0 (what upstream's
``load_audio`` does before the 128-mel front end); ``mono="mean"`` averages the channels instead,
which is what upstream does for the 24 kHz token2wav prompt mel.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from stepaudio2.errors import AudioError

# Rates outside this range are almost certainly a header or client bug, not real audio.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000

MonoMode = Literal["first", "mean"]

# Raw PCM sample formats accepted by decode_audio: numpy dtype (little-endian) and full-scale value.
_PCM_FORMATS: dict[str, tuple[str, float]] = {
    "int16": ("<i2", 32768.0),
    "int32": ("<i4", 2147483648.0),
    "float32": ("<f4", 1.0),
}


def check_sample_rate(sr: object) -> int:
    """Return ``sr`` as an int, or raise AudioError when it is not a plausible audio rate."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float, np.floating)):
        raise AudioError(f"sample rate must be a number, got {type(sr).__name__}")
    if isinstance(sr, (float, np.floating)):
        if not math.isfinite(sr) or sr != int(sr):
            raise AudioError(f"sample rate must be a whole number of Hz, got {sr}")
    rate = int(sr)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate} Hz is out of range [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
    return rate


def to_mono(wav: np.ndarray, mono: MonoMode = "first") -> np.ndarray:
    """Reduce a (frames, channels) array to 1-D; 1-D input is returned unchanged."""
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise AudioError(f"waveform must be 1-D or (frames, channels), got shape {wav.shape}")
    if mono == "first":
        return wav[:, 0]
    if mono == "mean":
        return wav.mean(axis=1)
    raise AudioError(f"unknown mono mode '{mono}' (first or mean)")


def validate_waveform(wav: np.ndarray, sr: int, *, max_seconds: float | None = None) -> np.ndarray:
    """Check a mono waveform and return it as contiguous float32.

    Raises AudioError for: not 1-D, not floating point, empty, NaN/Inf samples, implausible sample
    rate, or longer than ``max_seconds``.
    """
    rate = check_sample_rate(sr)
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise AudioError(f"waveform must be 1-D mono, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        # Integer samples have no agreed full scale here; decode_audio(pcm_dtype=...) scales them.
        raise AudioError(f"waveform must be floating point in [-1, 1], got dtype {arr.dtype}")
    if arr.size == 0:
        raise AudioError("audio is empty")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - n_nan - np.isfinite(arr).sum())
        raise AudioError(f"audio contains non-finite samples ({n_nan} NaN, {n_inf} Inf)")
    if max_seconds is not None and arr.size > max_seconds * rate:
        raise AudioError(f"audio is {arr.size / rate:.1f} s long, more than the {max_seconds:g} s limit")
    return arr


def _decode_pcm(data: bytes, dtype: str, channels: int) -> np.ndarray:
    if dtype not in _PCM_FORMATS:
        raise AudioError(f"unknown raw PCM dtype '{dtype}' (one of {', '.join(_PCM_FORMATS)})")
    np_dtype, full_scale = _PCM_FORMATS[dtype]
    if channels < 1:
        raise AudioError(f"raw PCM channel count must be >= 1, got {channels}")
    frame_bytes = np.dtype(np_dtype).itemsize * channels
    if len(data) % frame_bytes:
        raise AudioError(
            f"raw PCM byte length {len(data)} is not a multiple of {frame_bytes} ({dtype} x {channels} channel(s))"
        )
    samples = np.frombuffer(data, dtype=np_dtype).astype(np.float32)
    if full_scale != 1.0:
        samples /= np.float32(full_scale)
    return samples.reshape(-1, channels)


def decode_audio(
    data: bytes,
    *,
    pcm_sample_rate: int | None = None,
    pcm_dtype: str = "int16",
    pcm_channels: int = 1,
    mono: MonoMode = "first",
) -> tuple[np.ndarray, int]:
    """Decode audio bytes into (mono float32 waveform, sample rate).

    With ``pcm_sample_rate`` the bytes are headerless little-endian PCM (``pcm_dtype`` int16, int32 or
    float32, interleaved ``pcm_channels``). Otherwise anything libsndfile reads (WAV 16/24/32-bit int
    or float, FLAC, OGG...) is accepted. Multichannel audio keeps channel 0 unless ``mono="mean"``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError(f"audio data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AudioError("audio is empty")
    if pcm_sample_rate is not None:
        sr = check_sample_rate(pcm_sample_rate)
        frames = _decode_pcm(data, pcm_dtype, pcm_channels)
    else:
        try:
            frames, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioError(f"could not decode audio: {exc}") from exc
    wav = to_mono(frames, mono)
    return validate_waveform(wav, sr), int(sr)


def load_audio(path: str | Path, *, mono: MonoMode = "first") -> tuple[np.ndarray, int]:
    """Read an audio file into (mono float32 waveform, sample rate)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise AudioError(f"could not read audio file '{p}': {exc.strerror or exc}") from exc
    return decode_audio(data, mono=mono)


def encode_wav(wav: np.ndarray, sr: int) -> bytes:
    """Encode a mono float waveform as a 16-bit PCM WAV file (samples clipped to [-1, 1))."""
    rate = check_sample_rate(sr)
    arr = np.asarray(wav, dtype=np.float64)
    if arr.ndim != 1:
        raise AudioError(f"waveform must be 1-D mono, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise AudioError("audio contains non-finite samples (NaN or Inf)")
    # x32768 so that decode (/32768) round-trips exactly; +1.0 clips to 32767.
    pcm = np.clip(np.round(arr * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
