"""token2wav driver: offline and streaming synthesis, chunk rule, batched pushes, seeds and the codes policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio2.errors import InvalidInputError
from stepaudio2.token2wav.prompt import VoicePrompt
from stepaudio2.token2wav.synth import Token2Wav, plan_chunks, sanitize_codes

from .flow_oracle import spec_offline

SAMPLES_PER_CODE = 2 * 480
# push_many runs the flow estimator on a batch of streams; the last bits of the mel then depend on the batch
# size (CPU GEMM blocking; mel within 1e-6 relative, see tests/test_t2w_flow.py). HiFT integrates F0 into the
# sine phase over a whole chunk (~24000 samples), which turns those ulps into up to a few 1e-4 in the samples.
BATCH_ATOL = 2e-3


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # as VoicePromptEncoder hands them out
    return a


def make_prompt(seed: int, n_tokens: int) -> VoicePrompt:
    rng = np.random.default_rng(seed)
    return VoicePrompt(
        tokens=_readonly(rng.integers(0, 6561, n_tokens).astype(np.int64)),
        xvector=_readonly(rng.standard_normal(192).astype(np.float32)),
        mel=_readonly((rng.standard_normal((2 * n_tokens, 80)) - 5.0).astype(np.float32)),
        key=f"synthetic-{seed}-{n_tokens}",
    )


def make_codes(seed: int, n: int) -> list[int]:
    return [int(c) for c in np.random.default_rng(seed).integers(0, 6561, n)]


@pytest.fixture(scope="session")
def t2w(tmp_path_factory: pytest.TempPathFactory) -> Token2Wav:
    from stepaudio2.token2wav.tiny_flow import write_tiny_flow
    from stepaudio2.token2wav.tiny_hift import write_tiny_hift

    root: Path = tmp_path_factory.mktemp("t2w_synth")
    write_tiny_flow(root, seed=0, preset="tiny")
    write_tiny_hift(root, seed=0, preset="tiny")
    return Token2Wav(root)


def test_end_to_end_from_the_bundled_voice(tmp_path: Path) -> None:
    """Prompt wav -> VoicePromptEncoder (stand-in ONNX front ends) -> Token2Wav, offline and streaming."""
    from stepaudio2.token2wav.prompt import VoicePromptEncoder, default_voice_path
    from stepaudio2.token2wav.tiny_flow import write_tiny_flow
    from stepaudio2.token2wav.tiny_hift import write_standin_onnx, write_tiny_hift

    write_tiny_flow(tmp_path, seed=1, preset="tiny")
    write_tiny_hift(tmp_path, seed=1, preset="tiny")
    write_standin_onnx(tmp_path, seed=1)
    prompt = VoicePromptEncoder(tmp_path).encode_file(default_voice_path())
    t2w = Token2Wav(tmp_path)
    codes = make_codes(30, 40)
    wav = t2w.offline(codes, prompt)
    assert wav.shape == (40 * SAMPLES_PER_CODE,) and np.all(np.isfinite(wav))
    # Oracle: the flow as the spec writes it (prompt tokens + codes, prompt mel as condition, CFG Euler steps),
    # then the vocoder with the request's seed; the prompt fed in is the encoder's, so the voice is used whole.
    mel = spec_offline(t2w.flow, codes, prompt)
    want, _ = t2w.hift.inference(mel[None], None, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(wav, np.clip(want[0].numpy(), -1.0, 1.0), atol=BATCH_ATOL)
    streamed = stream(t2w, prompt, codes, [13])
    assert streamed.shape == wav.shape
    np.testing.assert_array_equal(streamed, stream(t2w, prompt, codes, [len(codes)]))


def stream(t2w: Token2Wav, prompt: VoicePrompt, codes: list[int], sizes: list[int], seed: int = 0) -> np.ndarray:
    """Push `codes` in pieces of the given sizes (cycled), then end the stream."""
    s = t2w.start_stream(prompt, seed=seed)
    out, i, k = [], 0, 0
    while i < len(codes):
        n = sizes[k % len(sizes)]
        out.append(t2w.push(s, codes[i : i + n]))
        i, k = i + n, k + 1
    out.append(t2w.push(s, [], last=True))
    assert s.finished and s.samples_out == sum(o.size for o in out)
    return np.concatenate(out)


def test_chunk_rule() -> None:
    chunks, rest = plan_chunks(list(range(60)), last=False)
    assert [c for c, _ in chunks] == [list(range(28)), list(range(25, 53))] and rest == list(range(50, 60))
    chunks, rest = plan_chunks(list(range(60)), last=True)
    assert chunks[-1] == (list(range(50, 60)), True) and rest == []
    assert plan_chunks(list(range(27)), last=False) == ([], list(range(27)))


def test_codes_policy() -> None:
    assert sanitize_codes([1, 6561, 2, 6561], 6561) == [1, 2]
    assert sanitize_codes(np.array([0, 6560]), 6561) == [0, 6560]
    with pytest.raises(InvalidInputError, match="-1"):
        sanitize_codes([3, -1], 6561)
    with pytest.raises(InvalidInputError, match="6562"):
        sanitize_codes([6562], 6561)
    with pytest.raises(InvalidInputError, match="integers"):
        sanitize_codes([1.5], 6561)


def test_offline_length_range_and_seed(t2w: Token2Wav) -> None:
    p, codes = make_prompt(1, 20), make_codes(2, 37)
    wav = t2w.offline(codes, p, seed=3)
    assert wav.dtype == np.float32 and wav.shape == (37 * SAMPLES_PER_CODE,)
    assert np.all(np.abs(wav) <= 1.0) and np.all(np.isfinite(wav))
    assert np.array_equal(wav, t2w.offline(codes, p, seed=3))
    # Pad codes are dropped silently.
    assert np.array_equal(wav, t2w.offline(codes[:10] + [6561] + codes[10:] + [6561], p, seed=3))


def test_offline_rejects_bad_codes(t2w: Token2Wav) -> None:
    p = make_prompt(1, 20)
    with pytest.raises(InvalidInputError, match="no speech codes"):
        t2w.offline([], p)
    with pytest.raises(InvalidInputError, match="no speech codes"):
        t2w.offline([6561, 6561], p)
    with pytest.raises(InvalidInputError, match="outside"):
        t2w.offline([5, 7000], p)


def test_streaming_length_matches_offline(t2w: Token2Wav) -> None:
    for n in (5, 28, 61):
        wav = stream(t2w, make_prompt(3, 15), make_codes(n, n), [n])
        assert wav.shape == (n * SAMPLES_PER_CODE,) and np.all(np.abs(wav) <= 1.0)


def test_push_pattern_does_not_change_the_audio(t2w: Token2Wav) -> None:
    p, codes = make_prompt(4, 22), make_codes(5, 83)
    at_once = stream(t2w, p, codes, [len(codes)])
    assert np.array_equal(at_once, stream(t2w, p, codes, [1]))
    assert np.array_equal(at_once, stream(t2w, p, codes, [7, 30, 2]))


def test_streams_hold_back_the_overlap_until_the_end(t2w: Token2Wav) -> None:
    s = t2w.start_stream(make_prompt(6, 12))
    assert t2w.push(s, make_codes(7, 27)).size == 0  # below 25 + 3: buffered
    first = t2w.push(s, make_codes(8, 1))  # 28 codes: one chunk of 50 frames, minus the 3840 held back
    assert first.size == 50 * 480 - 8 * 480
    with pytest.raises(InvalidInputError, match="outside"):
        t2w.push(s, [-4])
    rest = t2w.push(s, [], last=True)
    assert first.size + rest.size == 28 * SAMPLES_PER_CODE
    with pytest.raises(InvalidInputError, match="already ended"):
        t2w.push(s, [1])


def test_empty_stream_is_an_error(t2w: Token2Wav) -> None:
    s = t2w.start_stream(make_prompt(6, 12))
    t2w.push(s, [6561])
    with pytest.raises(InvalidInputError, match="without any speech code"):
        t2w.push(s, [], last=True)


def test_same_seed_same_audio_and_streams_are_independent(t2w: Token2Wav) -> None:
    pa, pb = make_prompt(9, 18), make_prompt(10, 27)
    ca, cb = make_codes(11, 64), make_codes(12, 40)
    alone_a = stream(t2w, pa, ca, [9], seed=5)
    alone_b = stream(t2w, pb, cb, [9], seed=6)
    assert np.array_equal(alone_a, stream(t2w, pa, ca, [9], seed=5))
    # Interleaved pushes of two streams: each equals its stream alone (no state shared).
    sa, sb = t2w.start_stream(pa, seed=5), t2w.start_stream(pb, seed=6)
    got_a, got_b = [], []
    for i in range(0, 64, 9):
        got_a.append(t2w.push(sa, ca[i : i + 9]))
        got_b.append(t2w.push(sb, cb[i : i + 9]))
    got_a.append(t2w.push(sa, [], last=True))
    got_b.append(t2w.push(sb, [], last=True))
    assert np.array_equal(np.concatenate(got_a), alone_a)
    assert np.array_equal(np.concatenate(got_b), alone_b)


def test_push_many_over_three_streams_equals_each_alone(t2w: Token2Wav) -> None:
    prompts = [make_prompt(13, 20), make_prompt(14, 9), make_prompt(15, 31)]
    codes = [make_codes(16, 90), make_codes(17, 33), make_codes(18, 58)]
    alone = [stream(t2w, p, c, [len(c)], seed=i) for i, (p, c) in enumerate(zip(prompts, codes, strict=True))]
    sessions = [t2w.start_stream(p, seed=i) for i, p in enumerate(prompts)]
    got: list[list[np.ndarray]] = [[] for _ in prompts]
    # Ragged pushes: different amounts per stream per call, stream 1 ending first.
    pos = [0, 0, 0]
    for step, sizes in enumerate([(40, 33, 10), (50, 0, 30), (0, 0, 18)]):
        lasts = [step == 2, step == 0, step == 2]
        active = [i for i in range(3) if not sessions[i].finished]
        outs = t2w.push_many(
            [sessions[i] for i in active],
            [codes[i][pos[i] : pos[i] + sizes[i]] for i in active],
            [lasts[i] for i in active],
        )
        for i, o in zip(active, outs, strict=True):
            got[i].append(o)
            pos[i] += sizes[i]
    assert pos == [len(c) for c in codes]
    for a, g in zip(alone, got, strict=True):
        g = np.concatenate(g)
        assert g.shape == a.shape
        np.testing.assert_allclose(g, a, rtol=0, atol=BATCH_ATOL)
    with pytest.raises(InvalidInputError, match="twice"):
        s = t2w.start_stream(prompts[0])
        t2w.push_many([s, s], [[1], [2]], [False, False])


def test_voice_setup_is_cached_per_prompt_key(t2w: Token2Wav) -> None:
    p = make_prompt(19, 16)
    s1, s2 = t2w.start_stream(p), t2w.start_stream(p)
    assert s1.flow is not s2.flow
    assert s1.flow.estimator_att_cache is s2.flow.estimator_att_cache  # shared, never modified in place
    codes = make_codes(20, 45)
    a = np.concatenate([t2w.push(s1, codes), t2w.push(s1, [], last=True)])
    b = np.concatenate([t2w.push(s2, codes), t2w.push(s2, [], last=True)])
    assert np.array_equal(a, b)


def test_an_interrupted_push_many_leaves_its_streams_as_they_were(t2w: Token2Wav) -> None:
    from stepaudio2.token2wav.flow import RoundInterrupted

    prompts = [make_prompt(31, 12), make_prompt(32, 20)]
    codes = [make_codes(33, 60), make_codes(34, 40)]
    fresh = [t2w.start_stream(p, seed=i) for i, p in enumerate(prompts)]
    want = t2w.push_many(fresh, codes, [False, False])
    sessions = [t2w.start_stream(p, seed=i) for i, p in enumerate(prompts)]
    asked: list[int] = []
    with pytest.raises(RoundInterrupted, match="step 3"):
        t2w.push_many(sessions, codes, [False, False], interrupt=lambda k: asked.append(k) or k == 3)
    assert asked == [0, 1, 2, 3]
    assert all(s.codes_in == 0 and not s.buffer and s.samples_out == 0 and s.mel_tail is None for s in sessions)
    got = t2w.push_many(sessions, codes, [False, False], interrupt=lambda k: False)  # the same round, again
    for g, w in zip(got, want, strict=True):
        assert g.size > 0 and np.array_equal(g, w)
