"""Resampler: torchaudio-compatible windowed sinc (values printed once by torchaudio 2.11
``functional.resample``; torchaudio is not a project dependency), pitch, length and errors."""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.audio import resample
from stepaudio2.errors import AudioError


def _multitone(sr: int, secs: float) -> np.ndarray:
    t = np.arange(int(sr * secs)) / sr
    k = np.arange(1, 81)[:, None]
    tones = (0.01 * np.sin(2 * np.pi * (97.0 * k + 13.0) * t + k * k)).sum(0)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + env * tones).astype(np.float32)


def test_resample_matches_torchaudio_values() -> None:
    y = resample(_multitone(44100, 0.5), 44100, 16000)
    assert y.shape == (8000,) and y.dtype == np.float32
    for i, v in [(0, 0.008801), (1, 0.064372), (100, -0.285579), (7999, -0.039483)]:
        assert y[i] == pytest.approx(v, abs=5e-6)
    y = resample(_multitone(16000, 0.5), 16000, 24000)
    assert y.shape == (12000,)
    for i, v in [(0, 0.001951), (1, 0.036674), (100, -0.314626), (5000, -0.26264), (11999, -0.016404)]:
        assert y[i] == pytest.approx(v, abs=5e-6)


@pytest.mark.parametrize(
    "src,dst", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000), (16000, 24000), (16001, 16000)]
)
def test_resample_keeps_pitch_and_length(src: int, dst: int) -> None:
    n = src + 37
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / src)).astype(np.float32)
    y = resample(x, src, dst)
    assert y.size == -(-n * dst // src)
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert abs(np.argmax(spec) * dst / y.size - 440.0) <= 1.5
    mid = y[y.size // 4 : 3 * y.size // 4]
    assert abs(np.abs(mid).max() - 0.5) < 0.01


def test_resample_identity_and_errors() -> None:
    x = np.arange(10, dtype=np.float64)
    y = resample(x, 16000, 16000)
    assert y.dtype == np.float32 and np.array_equal(y, x)
    assert resample(np.zeros(0, np.float32), 44100, 16000).size == 0
    with pytest.raises(AudioError, match="1-D"):
        resample(np.zeros((4, 2)), 44100, 16000)
    with pytest.raises(AudioError, match="sample rate"):
        resample(x, 0, 16000)
