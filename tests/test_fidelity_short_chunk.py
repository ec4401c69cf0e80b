"""Issue 14 item 2: a trailing chunk (or a whole clip) of 1..320 samples is kept, as upstream keeps it.

Upstream slices the 16 kHz audio every 25 s, takes each slice's log-mel with a 479-sample pad and appends
`<audio_start>` + compute_token_num(T) x `<audio_patch>` + `<audio_end>` for every slice, however short. The
token count is reimplemented here from its definition (valid frames T - 2, conv2 + avg-pool halvings, the
adaptor's k3 s2 p1 conv).
"""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.audio import prepare_audio
from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import AudioInput, GenerationRequest, ReferencePipeline
from stepaudio2.text import tokens as T

SR = 16000
CHUNK = 25 * SR


def upstream_blocks(n_samples: int) -> list[tuple[int, int]]:
    """(mel frames, patch count) per 25 s slice, as upstream's chat template computes them."""
    out = []
    for start in range(0, n_samples, CHUNK):
        frames = (min(CHUNK, n_samples - start) + 479) // 160  # STFT of the padded slice, last frame dropped
        enc = ((frames - 2) + 1) // 2 // 2
        out.append((frames, (enc + 2 * 1 - 3) // 2 + 1))
    return out


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


@pytest.mark.parametrize("n", [1, 160, 161, 320, 321, 799, CHUNK + 1, CHUNK + 160, CHUNK + 320, CHUNK + 321,
                               2 * CHUNK + 5])
def test_chunks_and_counts_equal_upstream(n: int) -> None:
    feats = prepare_audio(_noise(n), SR)
    expect = upstream_blocks(n)
    assert [(m.shape[1], c) for m, c in zip(feats.mels, feats.placeholder_counts, strict=True)] == expect
    assert feats.valid_lengths == [f - 2 for f, _ in expect]


@pytest.mark.parametrize(("n", "blocks"), [(CHUNK + 100, [313, 0]), (200, [0])])
def test_reference_pipeline_runs_empty_blocks(tiny_checkpoint, n: int, blocks: list[int]) -> None:
    pipe = ReferencePipeline(tiny_checkpoint)
    request = GenerationRequest(task="asr", audio=AudioInput(_noise(n, seed=n), SR))
    prompt = pipe.build_prompt(request)
    assert [c for _, c in prompt.audio_spans] == blocks
    rendered = pipe.tokenizer.decode(prompt.ids)
    assert rendered.count(T.AUDIO_START + T.AUDIO_END) == blocks.count(0)
    chunks = pipe.backend.encode_audio(prompt.mels, prompt.mel_lengths)
    assert [c.shape[0] for c in chunks] == blocks
    request.sampling = SamplingParams(max_new_tokens=4)
    result = pipe.generate(request)
    assert result.prompt_tokens == len(prompt.ids) and 1 <= len(result.token_ids) <= 4
