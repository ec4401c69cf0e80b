"""Decoding, validation, WAV encoding and the bundled clips."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stepaudio2.audio import (
    decode_audio,
    encode_wav,
    load_audio,
    resample,
    validate_waveform,
)
from stepaudio2.errors import AudioError, InvalidInputError

ASSETS = Path(__file__).resolve().parents[1] / "stepaudio2" / "assets"


def _tone(freq: float, sr: int, secs: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * secs)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav_bytes(data: np.ndarray, sr: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    return float(np.argmax(spec) * sr / wav.size)


@pytest.mark.parametrize(
    "subtype,tol", [("PCM_16", 1 / 32768), ("PCM_24", 1e-6), ("PCM_32", 1e-8), ("FLOAT", 0.0)]
)
def test_decode_wav_subtypes(subtype: str, tol: float) -> None:
    x = _tone(440, 16000, 0.5)
    wav, sr = decode_audio(_wav_bytes(x, 16000, subtype))
    assert sr == 16000 and wav.dtype == np.float32 and wav.ndim == 1 and wav.shape == x.shape
    np.testing.assert_allclose(wav, x, atol=tol + 1e-9)


def test_decode_stereo_44k_takes_channel0_and_resamples_to_same_pitch() -> None:
    left, right = _tone(440, 44100, 1.0), _tone(1000, 44100, 1.0, amp=0.2)
    wav, sr = decode_audio(_wav_bytes(np.stack([left, right], axis=1), 44100, "PCM_16"))
    assert sr == 44100 and wav.shape == (44100,)
    np.testing.assert_allclose(wav, left, atol=1 / 32768)
    wav16 = resample(wav, sr, 16000)
    assert wav16.shape == (16000,) and wav16.dtype == np.float32
    assert abs(_peak_hz(wav16, 16000) - 440.0) <= 1.0
    # Amplitude survives the band-limited resampler (away from the edges).
    assert abs(np.abs(wav16[2000:-2000]).max() - 0.5) < 0.01


def test_decode_stereo_mean_mode() -> None:
    a, b = _tone(440, 16000, 0.2), _tone(440, 16000, 0.2, amp=0.1)
    wav, _ = decode_audio(_wav_bytes(np.stack([a, b], axis=1), 16000, "FLOAT"), mono="mean")
    np.testing.assert_allclose(wav, (a + b) / 2, atol=1e-7)


def test_decode_raw_pcm() -> None:
    x = _tone(300, 8000, 0.25)
    pcm16 = np.round(x * 32767).astype("<i2").tobytes()
    wav, sr = decode_audio(pcm16, pcm_sample_rate=8000)
    assert sr == 8000 and wav.shape == x.shape
    np.testing.assert_allclose(wav, x, atol=2 / 32768)
    wav, _ = decode_audio(x.astype("<f4").tobytes(), pcm_sample_rate=8000, pcm_dtype="float32")
    np.testing.assert_array_equal(wav, x)
    stereo = np.stack([x, -x], axis=1).astype("<f4").tobytes()
    wav, _ = decode_audio(stereo, pcm_sample_rate=8000, pcm_dtype="float32", pcm_channels=2)
    np.testing.assert_array_equal(wav, x)
    with pytest.raises(AudioError, match="multiple"):
        decode_audio(pcm16[:-1], pcm_sample_rate=8000)
    with pytest.raises(AudioError, match="dtype"):
        decode_audio(pcm16, pcm_sample_rate=8000, pcm_dtype="int12")


def test_bad_inputs_raise_audio_error() -> None:
    assert issubclass(AudioError, InvalidInputError)
    with pytest.raises(AudioError, match="audio is empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="audio is empty"):
        decode_audio(_wav_bytes(np.zeros(0, np.float32), 16000, "PCM_16"))
    with pytest.raises(AudioError, match="could not decode audio"):
        decode_audio(b"this is definitely not a sound file" * 10)
    nan_wav = _tone(440, 16000, 0.1)
    nan_wav[10] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        decode_audio(_wav_bytes(nan_wav, 16000, "FLOAT"))
    with pytest.raises(AudioError, match="NaN"):
        validate_waveform(nan_wav, 16000)
    with pytest.raises(AudioError, match="Inf"):
        validate_waveform(np.array([0.0, np.inf], np.float32), 16000)
    with pytest.raises(AudioError, match="audio is empty"):
        validate_waveform(np.zeros(0, np.float32), 16000)
    for rate in (0, -16000, 10, 10_000_000, 16000.5):
        with pytest.raises(AudioError, match="sample rate"):
            validate_waveform(np.zeros(10, np.float32), rate)  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="sample rate"):
        decode_audio(b"\x00\x00" * 10, pcm_sample_rate=5)
    with pytest.raises(AudioError, match="1-D"):
        validate_waveform(np.zeros((10, 2), np.float32), 16000)
    with pytest.raises(AudioError, match="limit"):
        validate_waveform(np.zeros(16001, np.float32), 16000, max_seconds=1.0)
    with pytest.raises(AudioError, match="floating point"):
        validate_waveform(np.zeros(10, np.int16), 16000)
    out = validate_waveform(np.zeros(16000, np.float64), 16000, max_seconds=1.0)
    assert out.dtype == np.float32


def test_load_audio_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="could not read"):
        load_audio(tmp_path / "nope.wav")


def test_encode_wav_round_trip() -> None:
    x = _tone(440, 24000, 0.3, amp=0.9)
    x[0], x[1] = 1.5, -1.5  # clipped, not wrapped
    data = encode_wav(x, 24000)
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    wav, sr = decode_audio(data)
    assert sr == 24000
    assert wav[0] == pytest.approx(32767 / 32768) and wav[1] == -1.0
    np.testing.assert_allclose(wav[2:], x[2:], atol=0.5 / 32768 + 1e-7)


@pytest.mark.parametrize("name", ["hello_en", "weather_en", "nihao_zh", "default_voice"])
def test_bundled_clips(name: str) -> None:
    path = ASSETS / f"{name}.wav"
    assert path.stat().st_size < 200_000
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert (ASSETS / f"{name}.txt").read_text(encoding="utf-8").strip()
    wav, sr = load_audio(path)
    assert sr == 16000 and 0.05 < np.abs(wav).max() <= 1.0
    if name == "default_voice":
        assert 3.0 <= wav.size / sr <= 5.0


def test_audio_package_does_not_import_torch() -> None:
    code = "import sys, stepaudio2.audio; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
