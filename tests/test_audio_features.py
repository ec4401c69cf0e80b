"""Chunking, frame counts and the placeholder convention (spec 1.1/1.2, HF path)."""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.audio import (
    CHUNK_SAMPLES,
    AudioFeatures,
    adaptor_output_length,
    encoder_output_length,
    encoder_valid_length,
    log_mel_128,
    mel_frames,
    pad_mels,
    placeholder_count,
    prepare_audio,
)
from stepaudio2.errors import AudioError

SR = 16000


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("secs,frames", [(1, 102), (5, 502), (10, 1002), (25, 2502)])
def test_frame_counts(secs: int, frames: int) -> None:
    assert mel_frames(secs * SR) == frames


@pytest.mark.parametrize("secs,count", [(1, 13), (5, 63), (10, 125), (25, 313)])
def test_placeholder_counts(secs: int, count: int) -> None:
    assert placeholder_count(mel_frames(secs * SR)) == count


def test_length_chain() -> None:
    assert encoder_valid_length(102) == 100
    assert encoder_output_length(100) == 25
    assert adaptor_output_length(25) == 13
    assert encoder_output_length(2500) == 625 and adaptor_output_length(625) == 313
    # The chain is what placeholder_count composes, for every chunk length.
    for n in range(321, 3 * SR, 997):
        t = mel_frames(n)
        assert placeholder_count(t) == adaptor_output_length(encoder_output_length(t - 2)) >= 1
    assert placeholder_count(mel_frames(320)) == 0 and placeholder_count(mel_frames(321)) == 1


@pytest.mark.parametrize("n", [321, 479, 480, 1600, 16000, 16159, 16160, 12345])
def test_mel_frames_matches_stft(n: int) -> None:
    assert log_mel_128(_noise(n)).shape == (128, mel_frames(n))


def test_prepare_audio_one_second() -> None:
    feats = prepare_audio(_noise(SR), SR)
    assert isinstance(feats, AudioFeatures)
    assert feats.num_chunks == 1
    assert feats.mels[0].shape == (128, 102) and feats.mels[0].dtype == np.float32
    assert feats.valid_lengths == [100] and feats.placeholder_counts == [13]
    assert feats.total_placeholders == 13


def test_prepare_audio_sixty_seconds_three_chunks() -> None:
    wav = _noise(60 * SR)
    feats = prepare_audio(wav, SR)
    assert [m.shape[1] for m in feats.mels] == [2502, 2502, 1002]
    assert feats.valid_lengths == [2500, 2500, 1000]
    assert feats.placeholder_counts == [313, 313, 125]
    # Each chunk is normalised on its own (per-chunk max - 8 clamp), exactly as a lone chunk would be.
    np.testing.assert_array_equal(feats.mels[2], log_mel_128(wav[2 * CHUNK_SAMPLES :]))


def test_prepare_audio_resamples_to_16k() -> None:
    feats = prepare_audio(_noise(48000), 48000)
    assert feats.mels[0].shape == (128, 102) and feats.placeholder_counts == [13]


def test_prepare_audio_keeps_tiny_tail_and_tiny_audio_as_empty_blocks() -> None:
    # Upstream keeps a chunk of 1..320 samples: 3-4 mel frames, 0 placeholders (issue 14 item 2).
    feats = prepare_audio(_noise(CHUNK_SAMPLES + 100), SR)
    assert feats.placeholder_counts == [313, 0] and feats.mels[1].shape == (128, 3)
    feats = prepare_audio(_noise(CHUNK_SAMPLES + 321), SR)
    assert feats.placeholder_counts == [313, 1]
    feats = prepare_audio(_noise(100), SR)
    assert feats.placeholder_counts == [0] and feats.valid_lengths == [1]


def test_prepare_audio_length_cap() -> None:
    with pytest.raises(AudioError, match="600 s limit"):
        prepare_audio(np.zeros(600 * SR + 1, np.float32), SR)
    with pytest.raises(AudioError, match="2 s limit"):
        prepare_audio(_noise(3 * SR), SR, max_seconds=2.0)
    assert prepare_audio(_noise(3 * SR), SR, max_seconds=None).num_chunks == 1


def test_prepare_audio_rejects_bad_audio() -> None:
    with pytest.raises(AudioError, match="audio is empty"):
        prepare_audio(np.zeros(0, np.float32), SR)
    bad = _noise(SR)
    bad[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        prepare_audio(bad, SR)


def test_pad_mels() -> None:
    mels = [log_mel_128(_noise(SR)), log_mel_128(_noise(SR // 2, seed=1))]
    batch, lengths = pad_mels(mels)
    assert batch.shape == (2, 128, 102) and batch.dtype == np.float32
    assert lengths.dtype == np.int64 and lengths.tolist() == [100, 50]
    np.testing.assert_array_equal(batch[1, :, :52], mels[1])
    assert not batch[1, :, 52:].any()
    with pytest.raises(AudioError):
        pad_mels([])
    with pytest.raises(AudioError, match="shape"):
        pad_mels([np.zeros((80, 10), np.float32)])
