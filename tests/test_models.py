"""Torch modules: KV-cached decoding equals full recomputation; audio encoding is batch invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepaudio2.engines.llm import splice_audio
from stepaudio2.errors import InvalidInputError
from stepaudio2.models.encoder import adaptor_output_lengths, encoder_output_lengths


def _mels(seed: int, frames: list[int], n_mels: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = max(frames)
    mel = torch.zeros(len(frames), n_mels, t)
    for i, f in enumerate(frames):
        mel[i, :, :f] = torch.randn(n_mels, f, generator=g)
    return mel, torch.tensor(frames) - 2  # HF convention: valid length = frames - 2


def test_output_lengths_formula() -> None:
    mel_frames = torch.tensor([102, 502, 1002, 2502])  # 1 s, 5 s, 10 s, 25 s
    enc = encoder_output_lengths(mel_frames - 2)
    assert adaptor_output_lengths(enc).tolist() == [13, 63, 125, 313]


def test_audio_encoding_is_batch_invariant(tiny_model) -> None:
    frames = [102, 57, 203]  # ragged, including an odd length
    mel, lengths = _mels(0, frames)
    with torch.inference_mode():
        # Each item carries its own batch length (mel_frames): the encoder then ignores the batch's padding.
        batched, n = tiny_model.encode_audio(mel, lengths, torch.tensor(frames))
        for i, f in enumerate(frames):
            alone, n1 = tiny_model.encode_audio(mel[i : i + 1, :, :f], lengths[i : i + 1])
            assert int(n1) == int(n[i])
            torch.testing.assert_close(batched[i, : int(n[i])], alone[0, : int(n1)], atol=1e-5, rtol=1e-5)


def test_kv_cached_decoding_matches_full_recompute_with_audio(tiny_model) -> None:
    mel, lengths = _mels(1, [150])
    with torch.inference_mode():
        emb, n = tiny_model.encode_audio(mel, lengths)
    count = int(n[0])
    ids = [5, 6, 7] + [9] * count + [11, 12]
    with torch.inference_mode():
        tokens_emb = tiny_model.model.embed_tokens(torch.tensor(ids)).numpy()
    prompt = torch.from_numpy(splice_audio(tokens_emb, [emb[0, :count].numpy()], [(3, count)]))
    assert torch.equal(prompt[3 : 3 + count], emb[0, :count])
    assert torch.equal(prompt[:3], torch.from_numpy(tokens_emb[:3]))

    steps = 16
    with torch.inference_mode():
        cache = tiny_model.new_cache()
        logits, cache = tiny_model(prompt[None], torch.arange(len(ids))[None], cache=cache)
        seq = prompt
        max_diff = 0.0
        tokens = []
        for _ in range(steps):
            full, _ = tiny_model(seq[None], torch.arange(seq.shape[0])[None])
            max_diff = max(max_diff, float((full[0, -1] - logits[0, -1]).abs().max()))
            token = int(logits[0, -1].argmax())
            assert token == int(full[0, -1].argmax())
            tokens.append(token)
            tok_emb = tiny_model.model.embed_tokens(torch.tensor([[token]]))
            logits, cache = tiny_model(tok_emb, torch.tensor([[seq.shape[0]]]), cache=cache)
            seq = torch.cat([seq, tok_emb[0]], dim=0)
    assert max_diff <= 1e-4
    assert len(tokens) == steps


def test_splice_rejects_count_mismatch() -> None:
    embeds = np.zeros((4, 8), np.float32)
    with pytest.raises(InvalidInputError, match="placeholders"):
        splice_audio(embeds, [np.ones((3, 8), np.float32)], [(1, 2)])
    with pytest.raises(InvalidInputError, match="audio block"):
        splice_audio(embeds, [], [(1, 2)])


def test_position_table_bounds_chunk_length(tiny_model) -> None:
    # 25 s chunk -> 2502 frames -> 1251 positions of the 1500-row table: must run.
    mel, lengths = _mels(2, [2502])
    with torch.inference_mode():
        emb, n = tiny_model.encode_audio(mel, lengths)
    assert int(n[0]) == 313 and emb.shape[1] >= 313
    assert torch.isfinite(emb[0, :313]).all()
