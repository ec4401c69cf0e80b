"""Speech replies in the reference pipeline: voice-chat writes a 24 kHz wav, offline and streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from .conftest import ASSETS

CODE_SAMPLES = 2 * 480  # 2 mel frames per code, 480 samples per frame
# The wav holds 16-bit samples (half a step = 1.5e-5) of audio computed in another process (other thread
# counts: float summation order, which HiFT's phase integration amplifies to ~1e-5).
WAV_TOL = 2e-4


def _generate(ckpt: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "stepaudio2.cli", "generate", "--checkpoint", str(ckpt), "--task", "voice-chat",
         "--audio", str(ASSETS / "hello_en.wav"), "--temperature", "0", "--max-new-tokens", "150",
         "--out-wav", str(out), "--json", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_voice_chat_writes_wav_offline_and_streaming(tiny_checkpoint_full: Path, tmp_path: Path) -> None:
    _, result = _generate(tiny_checkpoint_full, tmp_path / "offline.wav")
    codes = [c for c in result["audio_codes"] if c < 6561]
    assert len(codes) > 28  # more than one streaming chunk, so the chunk rule is exercised
    wav, sr = sf.read(tmp_path / "offline.wav")
    assert sr == 24000 and wav.shape == (len(codes) * CODE_SAMPLES,)

    proc, streamed = _generate(tiny_checkpoint_full, tmp_path / "stream.wav", "--stream",
                               "--voice", str(ASSETS / "default_voice.wav"))
    assert streamed["audio_codes"] == result["audio_codes"]
    swav, ssr = sf.read(tmp_path / "stream.wav")
    assert ssr == 24000 and swav.shape == wav.shape
    assert "first audio chunk after" in proc.stderr
    # Oracle: the in-process token2wav on the same codes, offline and as one stream (the push pattern does not
    # change a stream's audio, tests/test_t2w_synth.py), in the bundled voice with seed 0.
    from stepaudio2.speech import SpeechOutput

    speech = SpeechOutput(tiny_checkpoint_full)
    np.testing.assert_allclose(wav, speech.offline(codes), atol=WAV_TOL)
    session = speech.token2wav.start_stream(speech.prompt, seed=0)
    want = np.concatenate([speech.token2wav.push(session, codes), speech.token2wav.push(session, [], last=True)])
    np.testing.assert_allclose(swav, want, atol=WAV_TOL)
