"""Audio -> encoder inputs: 25 s chunking, per-chunk log-mel, and the placeholder convention.

Convention (the HF path of spec 1.2; one convention for both the encoder mask and the prompt):

* Audio is resampled to 16 kHz and split into 25 s chunks (400 000 samples; the last one shorter).
  Each chunk gets its own 128-mel (own max - 8 clamp) and its own ``<audio_start> ... <audio_end>``
  block in the prompt.
* ``mel_frames(N) = (N + 479) // 160``: frames of a chunk of N samples (1 s -> 102, 25 s -> 2502).
* ``encoder_valid_length(T) = T - 2``: the length handed to the encoder as ``x_len``; it removes the
  frames the 479-sample right pad adds.
* ``encoder_output_length(L) = ((L + 1) // 2) // 2``: conv2 (stride 2) then AvgPool(2) -> 25 Hz.
* ``adaptor_output_length(e) = (e - 1) // 2 + 1``: adaptor conv k3 s2 p1 -> 12.5 Hz.
* ``placeholder_count(T)`` = adaptor_output_length(encoder_output_length(T - 2)) is the number of
  ``<audio_patch>`` tokens for the chunk, and the number of adaptor rows that replace them
  (1 s -> 13, 5 s -> 63, 10 s -> 125, 25 s -> 313).
* A chunk too short to yield even one placeholder (1..320 samples: a trailing 25 s remainder, or a whole
  clip that short) is kept as upstream keeps it: its mel goes to the encoder and the prompt gets an empty
  ``<audio_start><audio_end>`` block (0 patches).
* ``pad_mels`` zero-pads along time to the longest chunk and returns the *valid* lengths (T - 2),
  exactly what upstream's padding helper passes to the encoder.

The vLLM path uses T instead of T - 2 and can differ by one placeholder; do not mix the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stepaudio2.audio.io import validate_waveform
from stepaudio2.audio.mel import HOP_LENGTH, MEL_PAD_SAMPLES, N_MELS, SAMPLE_RATE, log_mel_128
from stepaudio2.audio.resample import resample
from stepaudio2.errors import AudioError

CHUNK_SECONDS = 25
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 400 000
DEFAULT_MAX_SECONDS = 600.0


def mel_frames(num_samples: int) -> int:
    """Mel frames of a 16 kHz chunk of ``num_samples`` samples (after the 479 pad, last frame dropped)."""
    return (int(num_samples) + MEL_PAD_SAMPLES) // HOP_LENGTH


def encoder_valid_length(t_mel: int) -> int:
    """Encoder ``x_len`` for a chunk of ``t_mel`` frames (HF convention: T - 2)."""
    return int(t_mel) - 2


def encoder_output_length(valid_len: int) -> int:
    """Encoder output frames (25 Hz) for a valid mel length."""
    return ((int(valid_len) + 1) // 2) // 2


def adaptor_output_length(enc_len: int) -> int:
    """Adaptor output rows (12.5 Hz) for an encoder output length (conv k3 s2 p1)."""
    return (int(enc_len) - 1) // 2 + 1


def placeholder_count(t_mel: int) -> int:
    """Number of ``<audio_patch>`` tokens for a chunk of ``t_mel`` mel frames."""
    return max(0, adaptor_output_length(encoder_output_length(encoder_valid_length(t_mel))))


def chunk_waveform(wav16k: np.ndarray, chunk_samples: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Split a 16 kHz waveform into consecutive views of at most ``chunk_samples`` samples."""
    return [wav16k[i : i + chunk_samples] for i in range(0, len(wav16k), chunk_samples)]


@dataclass
class AudioFeatures:
    """Encoder inputs of one audio clip: one entry per 25 s chunk, in order."""

    mels: list[np.ndarray] = field(default_factory=list)  # each (128, T_k) float32
    valid_lengths: list[int] = field(default_factory=list)  # T_k - 2, the encoder x_len
    placeholder_counts: list[int] = field(default_factory=list)  # <audio_patch> tokens per chunk

    @property
    def num_chunks(self) -> int:
        return len(self.mels)

    @property
    def total_placeholders(self) -> int:
        return sum(self.placeholder_counts)


def prepare_audio(
    wav: np.ndarray, sr: int, *, max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> AudioFeatures:
    """Validate, resample to 16 kHz, chunk at 25 s and compute each chunk's 128-mel.

    Raises AudioError for empty / non-finite / too long (``max_seconds``) audio. Chunks of 1..320 samples give
    0 placeholders and are kept, as upstream keeps them.
    """
    arr = validate_waveform(wav, sr, max_seconds=max_seconds)
    wav16k = resample(arr, sr, SAMPLE_RATE)
    feats = AudioFeatures()
    for chunk in chunk_waveform(wav16k):
        t_mel = mel_frames(chunk.size)
        n = placeholder_count(t_mel)  # 0 for 1..320 samples: an empty block, as upstream builds it
        feats.mels.append(log_mel_128(chunk))  # (128, t_mel); tests pin the formula to the STFT
        feats.valid_lengths.append(encoder_valid_length(t_mel))
        feats.placeholder_counts.append(n)
    return feats


def pad_mels(mels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack (128, T_k) mels into a zero-padded (B, 128, T_max) float32 batch.

    Returns the batch and int64 valid lengths (T_k - 2, the encoder ``x_len``).
    """
    if len(mels) == 0:
        raise AudioError("no mel chunks to pad")
    for i, m in enumerate(mels):
        if m.ndim != 2 or m.shape[0] != N_MELS:
            raise AudioError(f"mel chunk {i} has shape {m.shape}, expected ({N_MELS}, T)")
    t_max = max(m.shape[1] for m in mels)
    batch = np.zeros((len(mels), N_MELS, t_max), dtype=np.float32)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    lengths = np.array([encoder_valid_length(m.shape[1]) for m in mels], dtype=np.int64)
    return batch, lengths
