"""Kaldi fbank and CAM++ features.

Reference numbers were printed once by torchaudio 2.11 (``compliance.kaldi.fbank`` run in float64);
torchaudio is not a project dependency. Upstream runs fbank in float32,
whose own rounding moves values by up to ~3e-4, hence the 1e-3 tolerance on those numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.audio import campplus_features, kaldi_fbank_80, kaldi_mel_banks
from stepaudio2.errors import AudioError

from .conftest import TORCH_EXTRA, require_module


def _multitone(sr: int, secs: float) -> np.ndarray:
    t = np.arange(int(sr * secs)) / sr
    k = np.arange(1, 81)[:, None]
    tones = (0.01 * np.sin(2 * np.pi * (97.0 * k + 13.0) * t + k * k)).sum(0)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + env * tones).astype(np.float32)


def test_kaldi_mel_banks_match_torchaudio() -> None:
    banks = kaldi_mel_banks()
    assert banks.shape == (80, 257) and not banks[:, 256].any()
    for row, first_idx, last_idx, first_vals, total in [
        (0, [1, 2], 2, [0.5039816498756409, 0.13572286069393158], 0.6397045254707336),
        (1, [2], 2, [0.8642771244049072], 0.8642771244049072),
        (
            40,
            [57, 58, 59],
            61,
            [0.2189219743013382, 0.6257609724998474, 0.9724243879318237],
            2.5760250091552734,
        ),
        (
            79,
            [240, 241, 242],
            255,
            [0.07600222527980804, 0.19964227080345154, 0.3228175640106201],
            8.29085922241211,
        ),
    ]:
        nz = np.nonzero(banks[row])[0]
        assert nz[: len(first_idx)].tolist() == first_idx and nz[-1] == last_idx
        # torch's float32 log differs from numpy's by an ulp now and then: weights agree to ~2e-5.
        np.testing.assert_allclose(banks[row, first_idx], first_vals, rtol=1e-4)
        assert banks[row].sum() == pytest.approx(total, rel=1e-4)


def test_kaldi_fbank_matches_torchaudio_values() -> None:
    feats = kaldi_fbank_80(_multitone(16000, 1.5))
    assert feats.shape == (148, 80) and feats.dtype == np.float32  # 1 + (24000 - 400) // 160
    known = [
        (0, 0, -10.42126),
        (0, 40, -1.11109),
        (5, 10, -3.55836),
        (17, 79, 0.72544),
        (50, 3, -8.34239),
        (100, 60, 0.82529),
        (147, 25, -2.74876),
        (147, 79, 1.98682),
        (75, 1, -8.61998),
        (75, 2, -6.16898),
    ]
    for t, b, v in known:
        assert feats[t, b] == pytest.approx(v, abs=1e-3), (t, b)
    col_means = feats.mean(axis=0)[[0, 1, 2, 20, 40, 60, 79]]
    np.testing.assert_allclose(
        col_means, [-10.99755, -9.71527, -8.17092, -4.59319, -2.48316, -0.52906, 0.44553], atol=1e-3
    )


def test_kaldi_fbank_matches_torch_recomputation() -> None:
    """Same recipe spelled out step by step in torch (float64), frame by frame."""
    torch = require_module("torch", TORCH_EXTRA)
    x = _multitone(16000, 0.5)
    w = torch.from_numpy(x.astype(np.float64))
    frames = w.unfold(0, 400, 160)
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - 0.97 * prev) * torch.hann_window(400, periodic=False, dtype=torch.float64).pow(0.85)
    power = torch.fft.rfft(frames, n=512, dim=1).abs().pow(2)  # zero-padded to 512
    ref = torch.log(
        torch.clamp(
            power @ torch.from_numpy(np.array(kaldi_mel_banks())).T, min=float(np.finfo(np.float32).eps)
        )
    ).numpy()
    np.testing.assert_allclose(kaldi_fbank_80(x), ref, atol=1e-5)


def test_fbank_frame_count_and_short_input() -> None:
    for n, frames in [(400, 1), (559, 1), (560, 2), (16000, 98)]:
        assert kaldi_fbank_80(np.zeros(n, np.float32)).shape == (frames, 80)
    assert kaldi_fbank_80(np.zeros(399, np.float32)).shape == (0, 80)
    # Digital silence floors at log(float32 eps).
    np.testing.assert_allclose(kaldi_fbank_80(np.zeros(800, np.float32)), np.log(np.finfo(np.float32).eps))
    with pytest.raises(AudioError, match="too short"):
        campplus_features(np.zeros(399, np.float32))


def test_campplus_features_are_mean_normalised() -> None:
    x = _multitone(16000, 1.0)
    feats = campplus_features(x)
    assert feats.shape == (98, 80) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    raw = kaldi_fbank_80(x)
    np.testing.assert_allclose(feats, raw - raw.mean(axis=0), atol=1e-5)
    # Input is used as given ([-1, 1] floats); scaling shifts unfloored log energies by ln(gain^2)
    # and the mean removal cancels it.
    np.testing.assert_allclose(campplus_features(x * 4.0), feats, atol=1e-3)
