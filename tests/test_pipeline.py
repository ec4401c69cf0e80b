"""Reference pipeline end to end on the tiny checkpoint, the CLI, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import AudioError, InvalidInputError
from stepaudio2.pipeline import AudioInput, GenerationRequest, GenerationResult, ReferencePipeline

from .conftest import ASSETS


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint)


def _audio(seconds: float, sr: int = 16000, seed: int = 0) -> AudioInput:
    rng = np.random.default_rng(seed)
    return AudioInput((0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32), sr)


def test_asr_prompt_has_one_block_per_chunk_with_counts(pipe: ReferencePipeline) -> None:
    sp = pipe.tokenizer.special
    prompt = pipe.build_prompt(GenerationRequest(task="asr", audio=_audio(1.0)))
    assert [c for _, c in prompt.audio_spans] == [13]
    start, count = prompt.audio_spans[0]
    assert prompt.ids[start - 1] == sp.audio_start and prompt.ids[start + count] == sp.audio_end
    assert prompt.ids[start : start + count] == [sp.audio_patch] * 13
    long = pipe.build_prompt(GenerationRequest(task="asr", audio=_audio(60.0)))
    assert [c for _, c in long.audio_spans] == [313, 313, 125]


def test_generate_greedy_is_deterministic_and_streams_match_result(pipe: ReferencePipeline) -> None:
    req = GenerationRequest(task="asr", audio=_audio(2.0), sampling=SamplingParams(max_new_tokens=12))
    items = list(pipe.stream(req))
    result = items[-1]
    assert isinstance(result, GenerationResult)
    assert 1 <= len(result.token_ids) <= 12
    assert result.finish_reason in ("stop", "length")
    again = pipe.generate(req)
    assert again.token_ids == result.token_ids and again.text == result.text
    streamed = "".join(getattr(e, "text", "") for e in items[:-1] if type(e).__name__ == "TextDelta")
    # Streamed deltas are the decoded reply (plain content and spoken text together).
    assert streamed == result.text + result.tts_text or streamed.replace(result.tts_text, "", 1) == result.text


def test_seeded_sampling_reproduces_and_depends_on_seed(pipe: ReferencePipeline) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=seed)
        return pipe.generate(GenerationRequest(task="chat", text="hello there", sampling=params)).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_voice_chat_prompt_ends_with_tts_start(pipe: ReferencePipeline) -> None:
    prompt = pipe.build_prompt(GenerationRequest(task="voice-chat", audio=_audio(1.0)))
    assert prompt.generation == "speech"
    assert prompt.ids[-1] == pipe.tokenizer.special.tts_start


@pytest.mark.parametrize(
    ("request_kwargs", "error", "needle"),
    [
        ({"task": "asr", "audio": AudioInput(np.zeros(0, np.float32), 16000)}, AudioError, "empty"),
        ({"task": "asr", "audio": AudioInput(np.array([0.1, np.nan] * 800, np.float32), 16000)}, AudioError, "NaN"),
        ({"task": "dance"}, InvalidInputError, "dance"),
        ({"task": None, "messages": [{"role": "robot", "content": "hi"}]}, InvalidInputError, "robot"),
        ({"task": "asr"}, InvalidInputError, "audio"),
    ],
)
def test_bad_requests_raise_clear_errors(pipe: ReferencePipeline, request_kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle):
        pipe.build_prompt(GenerationRequest(**request_kwargs))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stepaudio2.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_generate_json_matches_pipeline(pipe: ReferencePipeline, tiny_checkpoint: Path) -> None:
    clip = ASSETS / "hello_en.wav"
    proc = _cli("generate", "--checkpoint", str(tiny_checkpoint), "--task", "asr", "--audio", str(clip),
                "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"token_ids", "text", "audio_codes", "tool_calls"}
    from stepaudio2.pipeline import load_audio_input

    ref = pipe.generate(GenerationRequest(task="asr", audio=load_audio_input(clip),
                                          sampling=SamplingParams(max_new_tokens=10)))
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


def test_cli_reports_bad_input_with_exit_status_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    proc = _cli("generate", "--checkpoint", str(tiny_checkpoint), "--task", "asr", "--audio", str(junk))
    assert proc.returncode == 2 and "audio" in proc.stderr.lower()
    proc = _cli("generate", "--checkpoint", str(tiny_checkpoint), "--task", "chat", "--text", "hi",
                "--temperature", "-1")
    assert proc.returncode == 2 and "temperature" in proc.stderr
