"""Mel front ends that must match upstream bit-for-bit in shape and to ~1e-5 in value (numpy only).

* ``log_mel_128``: Step-Audio-2 encoder input (spec 1.1). Whisper-style log-mel of a 16 kHz
  chunk right-padded with 479 zeros; T = (N + 479) // 160 frames.
* ``s3_log_mel``: the same transform without the 479 pad, as the S3 speech tokenizer front end
  (``s3tokenizer.log_mel_spectrogram``) computes it; it also drops the last STFT frame, T = N // 160.
* ``mel_24k_80``: HiFi-GAN style 80-bin natural-log magnitude mel of a 24 kHz prompt (spec 4.1 step 3);
  T = N // 480 frames, i.e. 50 Hz.

The mel filterbank is the Slaney one that ``librosa.filters.mel`` builds by default (htk=False,
norm="slaney"), re-derived here so numpy is the only dependency.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from stepaudio2.errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
# Right pad Step-Audio-2 adds before the STFT; encoder_valid_length removes the 2 frames it adds.
MEL_PAD_SAMPLES = 479

PROMPT_SAMPLE_RATE = 24_000
PROMPT_N_FFT = 1920
PROMPT_HOP = 480
PROMPT_N_MELS = 80

# Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel_slaney(freq: np.ndarray | float) -> np.ndarray:
    """Hz -> Slaney mel (librosa.hz_to_mel with htk=False)."""
    f = np.asarray(freq, dtype=np.float64)
    safe = np.maximum(f, _MIN_LOG_HZ)  # avoid log of 0 in the branch np.where discards
    return np.where(f >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(safe / _MIN_LOG_HZ) / _LOGSTEP, f / _F_SP)


def mel_to_hz_slaney(mels: np.ndarray | float) -> np.ndarray:
    """Slaney mel -> Hz (librosa.mel_to_hz with htk=False)."""
    m = np.asarray(mels, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@lru_cache(maxsize=8)
def _slaney_filterbank_cached(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    edges = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney area normalisation: each triangle integrates to a constant in Hz.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    out = weights.astype(np.float32)  # librosa hands back float32 and upstream multiplies with that
    out.flags.writeable = False
    return out


def slaney_mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32 filterbank equal to librosa.filters.mel's defaults. Read-only."""
    top = sr / 2.0 if fmax is None else float(fmax)
    return _slaney_filterbank_cached(int(sr), int(n_fft), int(n_mels), float(fmin), top)


@lru_cache(maxsize=8)
def _hann_periodic(n: int) -> np.ndarray:
    # torch.hann_window default (periodic=True): denominator n, not n - 1.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.flags.writeable = False
    return w


def _frames(x: np.ndarray, n_fft: int, hop: int, n_frames: int) -> np.ndarray:
    """(n_frames, n_fft) strided view of x; caller guarantees the frames fit."""
    view = np.lib.stride_tricks.sliding_window_view(x, n_fft)
    return view[: (n_frames - 1) * hop + 1 : hop]


def _power_spectrogram(x: np.ndarray, n_fft: int, hop: int, n_frames: int) -> np.ndarray:
    """|rfft(frame * hann)|^2 as (1 + n_fft // 2, n_frames) float64."""
    spec = np.fft.rfft(_frames(x, n_fft, hop, n_frames) * _hann_periodic(n_fft), n=n_fft, axis=-1)
    return (spec.real**2 + spec.imag**2).T


def _as_mono_f64(wav: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise AudioError(f"{what} expects a 1-D waveform, got shape {arr.shape}")
    return arr.astype(np.float64)


def _whisper_log_mel(x: np.ndarray) -> np.ndarray:
    """Whisper-style 128-mel of an already padded 16 kHz signal, centre-reflect STFT, last frame dropped."""
    half = N_FFT // 2
    if x.size <= half:
        raise AudioError(f"audio is too short for the mel front end ({x.size} samples, need > {half})")
    padded = np.pad(x, half, mode="reflect")  # torch.stft(center=True, pad_mode="reflect")
    n_frames = x.size // HOP_LENGTH  # 1 + x.size // hop frames exist; the last one is dropped
    if n_frames == 0:
        raise AudioError(f"audio is too short for the mel front end ({x.size} samples)")
    power = _power_spectrogram(padded, N_FFT, HOP_LENGTH, n_frames)
    mel = slaney_mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS, 0.0, SAMPLE_RATE / 2.0) @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def log_mel_128(wav16k: np.ndarray) -> np.ndarray:
    """Step-Audio-2 encoder features of one 16 kHz chunk: (128, (N + 479) // 160) float32."""
    x = _as_mono_f64(wav16k, "log_mel_128")
    return _whisper_log_mel(np.pad(x, (0, MEL_PAD_SAMPLES)))


def s3_log_mel(wav16k: np.ndarray) -> np.ndarray:
    """S3 speech-tokenizer features of a 16 kHz waveform (no pad): (128, N // 160) float32."""
    return _whisper_log_mel(_as_mono_f64(wav16k, "s3_log_mel"))


def mel_24k_80(wav24k: np.ndarray) -> np.ndarray:
    """token2wav prompt mel of a 24 kHz waveform: (80, N // 480) float32, natural log of magnitude."""
    x = _as_mono_f64(wav24k, "mel_24k_80")
    side = (PROMPT_N_FFT - PROMPT_HOP) // 2  # 720: makes frame t centred on sample t * hop + hop / 2
    if x.size <= side:
        raise AudioError(f"prompt audio is too short for the 24 kHz mel ({x.size} samples, need > {side})")
    padded = np.pad(x, side, mode="reflect")
    n_frames = 1 + (padded.size - PROMPT_N_FFT) // PROMPT_HOP
    if n_frames < 1:
        raise AudioError(f"prompt audio is too short for the 24 kHz mel ({x.size} samples)")
    power = _power_spectrogram(padded, PROMPT_N_FFT, PROMPT_HOP, n_frames)
    magnitude = np.sqrt(power + 1e-9)
    fb = slaney_mel_filterbank(PROMPT_SAMPLE_RATE, PROMPT_N_FFT, PROMPT_N_MELS, 0.0, 8000.0)
    return np.log(np.maximum(fb @ magnitude, 1e-5)).astype(np.float32)
