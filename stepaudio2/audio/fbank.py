"""Kaldi-compatible filterbank features for the CAM++ speaker model (numpy only).

Reproduces ``torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80, dither=0,
sample_frequency=16000)`` with every other argument at its default:

* 25 ms frames (400 samples), 10 ms shift (160), ``snip_edges``: 1 + (N - 400) // 160 frames, none
  if N < 400;
* per frame: remove the DC offset, pre-emphasis 0.97 (first sample uses itself as predecessor),
  Povey window (symmetric Hann ** 0.85), zero-pad to 512 and take the power spectrum;
* 80 triangular bins equally spaced on Kaldi's mel scale 1127 ln(1 + f / 700) between 20 Hz and
  Nyquist (high_freq 0 means Nyquist), built over the 256 lower FFT bins (the Nyquist bin gets 0);
* natural log floored at float32 epsilon.

Input scaling: upstream Step-Audio2 (``token2wav.py``, same as CosyVoice2) feeds the float waveform
from ``s3tokenizer.load_audio`` (torchaudio.load, i.e. [-1, 1]) straight into kaldi.fbank, *not*
multiplied by 32768 as Kaldi-trained recipes often do. So these functions take [-1, 1] floats too.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from stepaudio2.errors import AudioError

FBANK_SAMPLE_RATE = 16_000
FBANK_FRAME_LENGTH = 400  # 25 ms
FBANK_FRAME_SHIFT = 160  # 10 ms
FBANK_PADDED = 512  # round_to_power_of_two
FBANK_N_MELS = 80
FBANK_LOW_FREQ = 20.0
PREEMPHASIS = 0.97
# torch.finfo(torch.float32).eps, the floor kaldi.fbank applies before the log.
LOG_FLOOR = float(np.finfo(np.float32).eps)


def kaldi_mel_scale(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi / HTK mel: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


@lru_cache(maxsize=4)
def kaldi_mel_banks(
    num_bins: int = FBANK_N_MELS,
    padded_window: int = FBANK_PADDED,
    sample_rate: float = FBANK_SAMPLE_RATE,
    low_freq: float = FBANK_LOW_FREQ,
    high_freq: float = 0.0,
) -> np.ndarray:
    """(num_bins, padded_window // 2 + 1) Kaldi mel triangles as float64; read-only.

    The triangles are evaluated in float32 the way torchaudio builds them: the lowest bins hold only
    one or two FFT bins with small weights, so float64 weights would shift those log energies by ~2e-4.
    What remains is torch's float32 log rounding (an ulp here and there): weights agree to ~2e-5.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise AudioError(f"bad fbank frequency range [{low_freq}, {high}] for rate {sample_rate}")
    f32 = np.float32
    n_fft_bins = padded_window // 2
    mel_low = float(kaldi_mel_scale(low_freq))
    delta = (float(kaldi_mel_scale(high)) - mel_low) / (num_bins + 1)
    idx = np.arange(num_bins, dtype=f32)[:, None]
    left = f32(mel_low) + idx * f32(delta)
    center = f32(mel_low) + (idx + f32(1.0)) * f32(delta)
    right = f32(mel_low) + (idx + f32(2.0)) * f32(delta)
    freqs = np.arange(n_fft_bins, dtype=f32) * f32(sample_rate / padded_window)
    mel = (f32(1127.0) * np.log(f32(1.0) + freqs / f32(700.0)))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.zeros((num_bins, n_fft_bins + 1))
    banks[:, :n_fft_bins] = np.maximum(f32(0.0), np.minimum(up, down))
    banks.flags.writeable = False
    return banks


@lru_cache(maxsize=1)
def _povey_window() -> np.ndarray:
    n = FBANK_FRAME_LENGTH
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / (n - 1))) ** 0.85
    w.flags.writeable = False
    return w


def kaldi_fbank_80(wav16k: np.ndarray) -> np.ndarray:
    """Kaldi fbank of a 16 kHz [-1, 1] waveform: (T, 80) float32, T = 1 + (N - 400) // 160 (0 if N < 400)."""
    x = np.asarray(wav16k)
    if x.ndim != 1:
        raise AudioError(f"kaldi_fbank_80 expects a 1-D waveform, got shape {x.shape}")
    x = x.astype(np.float64)
    if x.size < FBANK_FRAME_LENGTH:
        return np.zeros((0, FBANK_N_MELS), dtype=np.float32)
    n_frames = 1 + (x.size - FBANK_FRAME_LENGTH) // FBANK_FRAME_SHIFT
    frames = np.lib.stride_tricks.sliding_window_view(x, FBANK_FRAME_LENGTH)[
        : (n_frames - 1) * FBANK_FRAME_SHIFT + 1 : FBANK_FRAME_SHIFT
    ]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * _povey_window()
    spec = np.fft.rfft(frames, n=FBANK_PADDED, axis=1)
    power = spec.real**2 + spec.imag**2
    energies = power @ kaldi_mel_banks().T
    return np.log(np.maximum(energies, LOG_FLOOR)).astype(np.float32)


def campplus_features(wav16k: np.ndarray) -> np.ndarray:
    """CAM++ input: kaldi_fbank_80 minus its per-bin mean over time, (T, 80) float32."""
    feats = kaldi_fbank_80(wav16k)
    if feats.shape[0] == 0:
        raise AudioError(
            f"prompt audio is too short for speaker features ({np.asarray(wav16k).size} samples, "
            f"need >= {FBANK_FRAME_LENGTH})"
        )
    return (feats - feats.mean(axis=0, keepdims=True)).astype(np.float32)
