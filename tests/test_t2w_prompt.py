"""Voice prompt: stand-in ONNX front ends (real names, several lengths), VoicePrompt shapes, cache, bad prompts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from stepaudio2.audio import load_audio
from stepaudio2.errors import AudioError, CheckpointError
from stepaudio2.token2wav.prompt import (
    VoicePrompt,
    VoicePromptEncoder,
    default_voice_path,
    fit_mel_to_tokens,
)
from stepaudio2.token2wav.tiny_hift import (
    StandinCAMPPlus,
    StandinS3Tokenizer,
    seeded_standin,
    write_standin_onnx,
)

SEED = 0


@pytest.fixture(scope="module")
def t2w_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prompt")
    write_standin_onnx(root, seed=SEED)
    return root


@pytest.fixture(scope="module")
def encoder(t2w_dir: Path) -> VoicePromptEncoder:
    return VoicePromptEncoder(t2w_dir, cache_size=8)


@pytest.fixture(scope="module")
def voice() -> tuple[np.ndarray, int]:
    return load_audio(default_voice_path())


def tone(seconds: float, sr: int = 16000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---- ONNX stand-ins ------------------------------------------------------------------------------------------


def test_tokenizer_standin_has_real_io(t2w_dir: Path) -> None:
    s = session(t2w_dir / "speech_tokenizer_v2_25hz.onnx")
    ins = {i.name: i for i in s.get_inputs()}
    assert [i.name for i in s.get_inputs()] == ["feats", "feats_length"]
    assert ins["feats"].type == "tensor(float)" and len(ins["feats"].shape) == 3 and ins["feats"].shape[1] == 128
    assert ins["feats_length"].type == "tensor(int32)" and len(ins["feats_length"].shape) == 1
    (out,) = s.get_outputs()
    assert out.name == "indices" and out.type == "tensor(int64)" and len(out.shape) == 2
    assert s.get_modelmeta().custom_metadata_map.get("stepaudio2_standin") == "1"


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 37, 400, 3001])
def test_tokenizer_standin_runs_at_25hz(t2w_dir: Path, frames: int) -> None:
    s = session(t2w_dir / "speech_tokenizer_v2_25hz.onnx")
    feats = np.random.default_rng(frames).standard_normal((1, 128, frames)).astype(np.float32)
    codes = s.run(None, {"feats": feats, "feats_length": np.array([frames], dtype=np.int32)})[0]
    assert codes.shape == (1, math.ceil(math.ceil(frames / 2) / 2))  # two stride-2 convs: 100 Hz -> 25 Hz
    assert codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() <= 6560
    # Same graph as the torch module on every length (the export did not freeze a shape).
    module = seeded_standin(StandinS3Tokenizer, SEED)
    ref = module(torch.from_numpy(feats), torch.tensor([frames], dtype=torch.int32)).numpy()
    # Exact on every frame except where an FSQ digit lies within float noise of a rounding boundary (|z| = 0.5),
    # where ONNX Runtime's and torch's last bits may round to different levels.
    tie = _fsq_ties(module, torch.from_numpy(feats))
    assert tie.mean() <= 0.05, tie.mean()
    np.testing.assert_array_equal(codes[~tie], ref[~tie])


def _fsq_ties(module: StandinS3Tokenizer, feats: torch.Tensor, eps: float = 1e-4) -> np.ndarray:
    """(B, T') True where some FSQ digit's pre-rounding value is within eps of +-0.5 (the same steps as forward)."""
    import torch.nn.functional as F

    with torch.no_grad():
        h = F.gelu(module.conv2(F.gelu(module.conv1(feats)))).transpose(1, 2)
        z = torch.tanh(2.0 * F.layer_norm(module.project_down(h), (module.project_down.out_features,)))
    return ((z * 0.999).abs() - 0.5).abs().lt(eps).any(dim=-1).numpy()


def test_tokenizer_standin_batch_and_lengths(t2w_dir: Path) -> None:
    s = session(t2w_dir / "speech_tokenizer_v2_25hz.onnx")
    feats = np.random.default_rng(1).standard_normal((2, 128, 40)).astype(np.float32)
    codes = s.run(None, {"feats": feats, "feats_length": np.array([40, 20], dtype=np.int32)})[0]
    assert codes.shape == (2, 10)
    assert (codes[1, 5:] == 0).all()  # past the second item's length
    codes_spread = s.run(None, {"feats": np.random.default_rng(2).standard_normal((1, 128, 4000)).astype(np.float32),
                                "feats_length": np.array([4000], dtype=np.int32)})[0]
    assert len(np.unique(codes_spread)) > 50


def test_campplus_standin_has_real_io(t2w_dir: Path) -> None:
    s = session(t2w_dir / "campplus.onnx")
    (inp,) = s.get_inputs()
    (out,) = s.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[2] == 80 and len(inp.shape) == 3
    assert out.name == "output" and out.type == "tensor(float)" and out.shape[1] == 192
    model = seeded_standin(StandinCAMPPlus, SEED + 1)
    for frames in (1, 2, 50, 997):
        x = np.random.default_rng(frames).standard_normal((1, frames, 80)).astype(np.float32)
        y = s.run(None, {"input": x})[0]
        assert y.shape == (1, 192) and y.dtype == np.float32
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=1e-4)


# ---- VoicePrompt ---------------------------------------------------------------------------------------------


def test_default_voice_prompt(encoder: VoicePromptEncoder, voice: tuple[np.ndarray, int]) -> None:
    wav, sr = voice
    p = encoder.encode(wav, sr)
    assert isinstance(p, VoicePrompt)
    wav16_samples = math.ceil(wav.size * 16000 / sr)
    t = p.tokens.shape[0]
    assert t == math.ceil(math.ceil((wav16_samples // 160) / 2) / 2)
    assert abs(t - wav.size / sr * 25) <= 1  # 25 Hz
    assert p.tokens.dtype == np.int64 and p.tokens.ndim == 1
    assert p.tokens.min() >= 0 and p.tokens.max() <= 6560
    assert p.mel.shape == (2 * t, 80) and p.mel.dtype == np.float32
    assert p.xvector.shape == (192,) and p.xvector.dtype == np.float32
    assert np.isfinite(p.mel).all() and np.isfinite(p.xvector).all()
    assert len(p.key) == 64
    with pytest.raises(ValueError):
        p.tokens[0] = 1  # shared through the cache: read-only


@pytest.mark.parametrize("sr", [16000, 24000, 44100])
def test_any_rate_gives_25hz_tokens_and_2t_mel(encoder: VoicePromptEncoder, sr: int) -> None:
    p = encoder.encode(tone(2.0, sr), sr)
    assert abs(p.tokens.shape[0] - 50) <= 1
    assert p.mel.shape == (2 * p.tokens.shape[0], 80)


def test_xvector_depends_on_audio(encoder: VoicePromptEncoder) -> None:
    a = encoder.encode(tone(1.5, freq=180.0), 16000)
    b = encoder.encode(tone(1.5, freq=700.0, seed=3), 16000)
    assert not np.allclose(a.xvector, b.xvector)
    assert a.key != b.key


def test_fit_mel_to_tokens() -> None:
    mel = np.arange(10 * 80, dtype=np.float32).reshape(10, 80)
    assert np.array_equal(fit_mel_to_tokens(mel, 4), mel[:8])
    padded = fit_mel_to_tokens(mel, 7)
    assert padded.shape == (14, 80)
    assert np.array_equal(padded[:10], mel) and (padded[10:] == mel[-1]).all()


def test_cache_hits_on_same_content(t2w_dir: Path, voice: tuple[np.ndarray, int], tmp_path: Path) -> None:
    enc = VoicePromptEncoder(t2w_dir, cache_size=4)
    wav, sr = voice
    first = enc.encode(wav, sr)
    assert enc.cache_info() == (0, 1, 1)
    assert enc.encode(wav.copy(), sr) is first
    copy_path = tmp_path / "renamed.wav"
    copy_path.write_bytes(default_voice_path().read_bytes())
    assert enc.encode_file(copy_path) is first  # keyed by content, not by path
    assert enc.encode(wav[:, None], sr) is first  # (frames, 1) is the same mono clip
    info = enc.cache_info()
    assert (info.hits, info.misses, info.size) == (3, 1, 1)
    assert enc.encode(wav, sr + 1).key != first.key  # same samples, other rate: other content
    changed = wav.copy()
    changed[100] += 0.01
    assert enc.encode(changed, sr).key != first.key
    assert enc.cache_info().misses == 3


def test_cache_is_bounded_lru(t2w_dir: Path) -> None:
    enc = VoicePromptEncoder(t2w_dir, cache_size=2)
    clips = [tone(0.5, freq=f) for f in (200.0, 300.0, 400.0)]
    for c in clips:
        enc.encode(c, 16000)
    assert enc.cache_info() == (0, 3, 2)
    enc.encode(clips[2], 16000)  # newest: still there
    assert enc.cache_info().hits == 1
    enc.encode(clips[0], 16000)  # oldest: evicted
    assert enc.cache_info() == (1, 4, 2)
    off = VoicePromptEncoder(t2w_dir, cache_size=0)
    off.encode(clips[0], 16000)
    off.encode(clips[0], 16000)
    assert off.cache_info() == (0, 2, 0)


def test_stereo_prompt(encoder: VoicePromptEncoder) -> None:
    left, right = tone(1.0, freq=200.0), tone(1.0, freq=500.0, seed=1)
    p = encoder.encode(np.stack([left, right], axis=1), 16000)
    mono = encoder.encode(left, 16000)
    assert np.array_equal(p.tokens, mono.tokens)  # 16 kHz features from channel 0, as upstream
    assert np.array_equal(p.xvector, mono.xvector)
    assert not np.array_equal(p.mel, mono.mel)  # the mel uses the channel mean
    assert p.key != mono.key


def test_encode_file(encoder: VoicePromptEncoder, tmp_path: Path) -> None:
    path = tmp_path / "p.wav"
    sf.write(path, tone(1.2, 22050), 22050, subtype="PCM_16")
    p = encoder.encode_file(path)
    assert p.mel.shape == (2 * p.tokens.shape[0], 80)
    with pytest.raises(AudioError, match="could not read"):
        encoder.encode_file(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    with pytest.raises(AudioError):
        encoder.encode_file(bad)


@pytest.mark.parametrize(
    ("wav", "sr", "message"),
    [
        (np.zeros(0, dtype=np.float32), 16000, "empty"),
        (np.zeros(16000, dtype=np.float32), 16000, "silent"),
        (np.full(16000, 5e-5, dtype=np.float32), 16000, "silent"),
        (np.full(16000 * 31, 0.1, dtype=np.float32), 16000, "31.0 s.*30 s"),
        (np.where(np.arange(16000) == 7, np.nan, 0.1).astype(np.float32), 16000, "non-finite|NaN"),
        (np.full(16000, 0.1, dtype=np.float32), 0, "sample rate"),
        (np.full((10, 2, 2), 0.1, dtype=np.float32), 16000, "shape"),
        (np.full(16000, 1000, dtype=np.int16), 16000, "floating point"),
        (np.full(100, 0.1, dtype=np.float32), 16000, "too short"),
    ],
)
def test_bad_prompts(encoder: VoicePromptEncoder, wav: np.ndarray, sr: int, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        encoder.encode(wav, sr)


def test_missing_models(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="speech_tokenizer_v2_25hz.onnx"):
        VoicePromptEncoder(tmp_path)
    (tmp_path / "speech_tokenizer_v2_25hz.onnx").write_bytes(b"junk")
    (tmp_path / "campplus.onnx").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load"):
        VoicePromptEncoder(tmp_path)


def test_standin_flag(encoder: VoicePromptEncoder) -> None:
    assert encoder.is_standin


def test_default_voice_exists() -> None:
    assert default_voice_path().is_file()
