"""Mel front ends against torch.stft oracles, and the Slaney filterbank against librosa's values.

The librosa numbers below were printed once by librosa 0.11 (``librosa.filters.mel`` defaults);
librosa itself is not a project dependency.
"""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.audio import log_mel_128, mel_24k_80, s3_log_mel, slaney_mel_filterbank
from stepaudio2.audio.mel import hz_to_mel_slaney, mel_to_hz_slaney
from stepaudio2.errors import AudioError

from .conftest import TORCH_EXTRA, require_module

torch = require_module("torch", TORCH_EXTRA)
F = torch.nn.functional


def _signal(sr: int, secs: float) -> np.ndarray:
    """Tone + chirp + a quiet lead-in, so the max - 8 clamp and the 1e-10 floor both matter."""
    t = np.arange(int(sr * secs)) / sr
    rng = np.random.default_rng(7)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * (200 * t + 1500 * t * t))
    x = x + 0.02 * rng.standard_normal(t.size)
    x[: sr // 5] *= 1e-4
    return x.astype(np.float32)


# ---- Slaney filterbank -----------------------------------------------------------------------------


def test_slaney_mel_scale_points() -> None:
    assert float(hz_to_mel_slaney(0.0)) == 0.0
    assert float(hz_to_mel_slaney(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel_slaney(500.0)) == pytest.approx(7.5)
    assert float(hz_to_mel_slaney(8000.0)) == pytest.approx(45.24564047192497, abs=1e-12)
    assert float(mel_to_hz_slaney(30.0)) == pytest.approx(2804.644130738921, abs=1e-9)
    f = np.linspace(0, 12000, 97)
    np.testing.assert_allclose(mel_to_hz_slaney(hz_to_mel_slaney(f)), f, atol=1e-9)


def test_filterbank_128_matches_librosa() -> None:
    fb = slaney_mel_filterbank(16000, 400, 128)
    assert fb.shape == (128, 201) and fb.dtype == np.float32
    known = {
        0: ([1], [0.012373986653983593]),
        1: ([1], [0.030392564833164215]),
        10: ([6, 7], [0.011289183981716633, 0.0010848019737750292]),
        64: ([42, 43], [0.0067496825940907, 0.018091518431901932]),
        127: (
            list(range(191, 200)),
            [
                0.0004756950947921723,
                0.0016171716852113605,
                0.002758648479357362,
                0.0039001251570880413,
                0.005041601601988077,
                0.004457120783627033,
                0.003342840587720275,
                0.0022285603918135166,
                0.0011142801959067583,
            ],
        ),
    }
    for row, (idx, vals) in known.items():
        assert np.nonzero(fb[row])[0].tolist() == idx
        np.testing.assert_allclose(fb[row, idx], vals, rtol=1e-6)
    assert float(fb.sum(dtype=np.float64)) == pytest.approx(3.1909855409403463, rel=1e-6)


def test_filterbank_24k_matches_librosa() -> None:
    fb = slaney_mel_filterbank(24000, 1920, 80, 0.0, 8000.0)
    assert fb.shape == (80, 961)
    for row, lo, hi, total, peak in [
        (0, 1, 5, 0.07999607641249895, 0.02666535973548889),
        (40, 133, 143, 0.07995374567690305, 0.01436969917267561),
        (79, 593, 639, 0.08000148494465975, 0.0033656926825642586),
    ]:
        nz = np.nonzero(fb[row])[0]
        assert (nz[0], nz[-1]) == (lo, hi)
        assert float(fb[row].sum(dtype=np.float64)) == pytest.approx(total, rel=1e-6)
        assert float(fb[row].max()) == pytest.approx(peak, rel=1e-6)
    assert float(fb.sum(dtype=np.float64)) == pytest.approx(6.399891552336612, rel=1e-6)
    assert not fb[:, 641:].any()  # nothing above fmax = 8 kHz (bin width 12.5 Hz)


# ---- torch oracles (the upstream formulas, written with torch.stft) --------------------------------


def _torch_whisper_mel(x: np.ndarray, pad: int) -> np.ndarray:
    audio = torch.from_numpy(x)
    if pad:
        audio = F.pad(audio, (0, pad))
    stft = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(np.array(slaney_mel_filterbank(16000, 400, 128))) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


def _torch_hifigan_mel(x: np.ndarray) -> np.ndarray:
    y = F.pad(torch.from_numpy(x)[None, None], (720, 720), mode="reflect")[:, 0]
    stft = torch.stft(
        y,
        1920,
        hop_length=480,
        win_length=1920,
        window=torch.hann_window(1920),
        center=False,
        return_complex=True,
    )
    spec = torch.sqrt(torch.view_as_real(stft).pow(2).sum(-1) + 1e-9)
    fb = torch.from_numpy(np.array(slaney_mel_filterbank(24000, 1920, 80, 0.0, 8000.0)))
    return torch.log(torch.clamp(fb @ spec, min=1e-5))[0].numpy()


@pytest.mark.parametrize("n", [16000, 40000, 12345, 321])
def test_log_mel_128_matches_torch(n: int) -> None:
    x = _signal(16000, 2.5)[:n]
    ours = log_mel_128(x)
    ref = _torch_whisper_mel(x, 479)
    assert ours.shape == ref.shape == (128, (n + 479) // 160) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert ours.min() >= ours.max() - 2.0 - 1e-6  # the (max - 8) clamp, after the /4


@pytest.mark.parametrize("n", [16000, 40000, 12345])
def test_s3_log_mel_matches_torch(n: int) -> None:
    x = _signal(16000, 2.5)[:n]
    ours = s3_log_mel(x)
    ref = _torch_whisper_mel(x, 0)
    assert ours.shape == ref.shape == (128, n // 160)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [24000, 60000, 24001, 1000])
def test_mel_24k_80_matches_torch(n: int) -> None:
    x = _signal(24000, 2.5)[:n]
    ours = mel_24k_80(x)
    ref = _torch_hifigan_mel(x)
    assert ours.shape == ref.shape == (80, n // 480) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_silence_and_short_inputs() -> None:
    # All-zero audio: every value floors at log10(1e-10) -> (-10 + 4) / 4.
    np.testing.assert_allclose(log_mel_128(np.zeros(16000, np.float32)), -1.5)
    with pytest.raises(AudioError, match="too short"):
        s3_log_mel(np.zeros(150, np.float32))
    with pytest.raises(AudioError, match="too short"):
        mel_24k_80(np.zeros(700, np.float32))
    with pytest.raises(AudioError, match="1-D"):
        log_mel_128(np.zeros((2, 16000), np.float32))
