"""Audio in and out of the gateway: base64 / upload checks (real audio, bounded duration) and 24 kHz PCM out.

The pipeline decodes the audio itself; the gateway only checks it early so that bad input is a 400 naming the
field instead of a round trip to Triton, and so that the duration limit holds before any work is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import wave

import numpy as np
import soundfile as sf

from stepaudio2_gateway.errors import APIError, bad

SAMPLE_RATE = 24000  # the pipeline's speech output


def decode_b64(data: object, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad("audio data must be a non-empty base64 string", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"audio data is not valid base64: {exc}", param) from exc
    if not raw:
        raise bad("audio data is empty", param)
    return raw


def check_audio(raw: bytes, param: str, max_seconds: float) -> float:
    """Duration in seconds of an audio file libsndfile can read (wav, flac, ogg, mp3); 400 otherwise."""
    try:
        info = sf.info(io.BytesIO(raw))
    except Exception as exc:  # libsndfile says only "format not recognised" for non-audio bytes
        raise bad(f"could not read the audio ({type(exc).__name__}: {exc}); send wav, flac, ogg or mp3",
                  param, code="invalid_audio") from exc
    if info.frames <= 0 or info.samplerate <= 0:
        raise bad("the audio has no samples", param, code="invalid_audio")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise APIError(400, f"the audio lasts {seconds:.1f} s; this server takes at most {max_seconds:.0f} s",
                       param=param, code="audio_too_long")
    return seconds


def pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian int16 bytes (what OpenAI calls pcm16; 24 kHz mono here)."""
    x = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_bytes(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()
