"""Issue 14 item 1: the encoder -> adaptor path equals upstream's, including the adaptor's last row, and stays
batch invariant.

The upstream recipe is reimplemented here (our own code, from the behaviour of the HF remote code): a request's
chunks are zero-padded to the longest (T), the key mask is the mel-rate valid mask sampled from (T + 1) % 2,
nothing past the valid length is zeroed, and the adaptor conv runs over the whole padded sequence. For an
encoder length that is odd the adaptor's last row therefore reads the encoder frame just past the valid length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepaudio2.audio import load_audio, pad_mels, prepare_audio
from stepaudio2.models.encoder import PAD_BIAS, adaptor_output_lengths, encoder_output_lengths
from stepaudio2.models.step_audio2 import load_model

from .conftest import ASSETS


def upstream_encode(model, mels: list[torch.Tensor], zero_past_valid: bool = False) -> list[torch.Tensor]:
    """One upstream request: chunks padded together, valid lengths T_k - 2, no masking of the outputs.

    `zero_past_valid` gives the old behaviour (frames past the valid length zeroed), to show the tests see it.
    """
    enc, ad = model.encoder, model.adapter
    t = max(m.shape[1] for m in mels)
    batch = torch.zeros(len(mels), mels[0].shape[0], t)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    valid = torch.tensor([m.shape[1] - 2 for m in mels])
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(batch)))).transpose(1, 2)
    x = x + enc.positional_embedding.weight[: x.shape[1]]
    mel_mask = torch.arange(t)[None] < valid[:, None]  # (B, T) at the mel rate
    keys = mel_mask[:, (t + 1) % 2 :: 2][:, : x.shape[1]]
    bias = torch.zeros(keys.shape).masked_fill(~keys, PAD_BIAS)[:, None, None, :]
    for block in enc.blocks:
        x = block(x, bias)
    x = enc.after_norm(F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2))
    n_enc = encoder_output_lengths(valid)
    if zero_past_valid:
        x = x * (torch.arange(x.shape[1])[None] < n_enc[:, None])[..., None]
    y = F.gelu(ad.conv(x.transpose(1, 2))).transpose(1, 2)
    y = ad.linear2(F.relu(ad.linear1(y)))
    n = adaptor_output_lengths(n_enc)
    return [y[i, : int(n[i])] for i in range(len(mels))]


def _mel(seed: int, frames: int) -> torch.Tensor:
    return torch.randn(128, frames, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["tiny", "taught"])
def model(request):
    ckpt = request.getfixturevalue("tiny_checkpoint" if request.param == "tiny" else "taught_checkpoint")
    return load_model(ckpt)


# T mod 8 in {0, 7} are the lengths whose last adaptor row reads past the valid length; the others must not move.
@pytest.mark.parametrize("frames", [96, 103, 111, 112, 102, 57, 150, 2502])
def test_single_clip_equals_upstream_including_last_row(model, frames: int) -> None:
    mel = _mel(frames, frames)
    with torch.inference_mode():
        expect = upstream_encode(model, [mel])[0]
        old = upstream_encode(model, [mel], zero_past_valid=True)[0]
        got, n = model.encode_audio(mel[None], torch.tensor([frames - 2]))
    assert int(n[0]) == expect.shape[0]
    torch.testing.assert_close(got[0, : int(n[0])], expect, atol=2e-5, rtol=1e-5)
    reads_past_valid = frames % 8 in (0, 7)
    # The recipe is sensitive to exactly that frame: zeroing it moves the last row and only the last row.
    moved = (old - expect).abs().amax(dim=1) > 1e-4
    assert moved[-1].item() is reads_past_valid and not moved[:-1].any()


def test_shipped_clip_equals_upstream(model) -> None:
    wav, sr = load_audio(ASSETS / "hello_en.wav")
    feats = prepare_audio(wav, sr)
    assert feats.mels[0].shape[1] % 8 in (0, 7)  # the shipped clip is one of the affected lengths
    mels = [torch.from_numpy(m) for m in feats.mels]
    batch, lengths = pad_mels(feats.mels)
    with torch.inference_mode():
        expect = upstream_encode(model, mels)
        got, n = model.encode_audio(torch.from_numpy(batch), torch.from_numpy(lengths))
    for k, e in enumerate(expect):
        torch.testing.assert_close(got[k, : int(n[k])], e, atol=2e-5, rtol=1e-5)


def test_dynamic_batch_gives_each_request_its_own_output(model) -> None:
    # Three "requests": one single chunk of each parity, and a two-chunk request (25 s + a short tail) whose
    # chunks upstream pads together. Batched across requests with their own mel_frames, every chunk must equal
    # its request run alone (upstream's output), and the batch must not leak into any row.
    requests = [[_mel(1, 111)], [_mel(2, 96)], [_mel(3, 2502), _mel(4, 57)], [_mel(5, 150)]]
    with torch.inference_mode():
        alone = [upstream_encode(model, r) for r in requests]
        chunks = [(m, max(c.shape[1] for c in r)) for r in requests for m in r]
        batch, lengths = pad_mels([m.numpy() for m, _ in chunks])
        frames = torch.tensor([f for _, f in chunks])
        got, n = model.encode_audio(torch.from_numpy(batch), torch.from_numpy(lengths), frames)
        # The served path: each chunk padded to its request's longest, sent as one item.
        served = []
        for m, f in chunks:
            padded = F.pad(m, (0, f - m.shape[1]))[None]
            e, k = model.encode_audio(padded, torch.tensor([m.shape[1] - 2]), torch.tensor([f]))
            served.append(e[0, : int(k[0])])
    flat = [e for r in alone for e in r]
    for k, e in enumerate(flat):
        torch.testing.assert_close(got[k, : int(n[k])], e, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(served[k], e, atol=2e-5, rtol=1e-5)
    # Without per-request frames a ragged batch is one upstream request: the 111-frame item then sees T = 2502.
    with torch.inference_mode():
        as_one, _ = model.encode_audio(torch.from_numpy(batch), torch.from_numpy(lengths))
    assert not np.allclose(as_one[0, : int(n[0])].numpy(), flat[0].numpy(), atol=1e-4)
