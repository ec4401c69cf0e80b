"""Graph-shaped wrappers of the token2wav modules: the exact signatures exported to ONNX / TensorRT.

Six graphs (file `<name>.onnx` in the token2wav version folder):
- `flow_encoder`: tokens (B, T) int64, token_lengths (B,) int64 -> mu (B, mel, r*T), mel_lengths (B,):
  token embedding + upsampling conformer + `encoder_proj` (offline, padding-aware).
- `flow_encoder_chunk`: the same for one streaming chunk, conformer caches in and out.
- `flow_estimator`: the DiT velocity for offline sampling; B is the CFG-doubled batch.
- `flow_estimator_chunk`: the DiT velocity for a batch of streaming chunks with their attention / conv caches
  as inputs and outputs; rows may belong to different streams (own cache and chunk lengths).
- `hift_f0`: mel -> F0 (Hz per frame).
- `hift_decoder`: mel + excitation source -> waveform (the generator proper, iSTFT included).
HiFT's source module (random initial phases and noise, drawn from each stream's seeded generator) is not a
graph: it stays in the runtime between `hift_f0` and `hift_decoder`, so seeds behave the same on every engine.

The STFT / iSTFT of the decoder are written as (transposed) convolutions with fixed DFT bases: neither
torch.istft nor complex tensors export to a graph that ONNX Runtime or TensorRT accept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.token2wav.dit import DiT, EstimatorChunk
from stepaudio2.token2wav.flow import CausalMaskedDiffWithXvec
from stepaudio2.token2wav.hift import HiFTGenerator

FLOW_ENCODER = "flow_encoder"
FLOW_ENCODER_CHUNK = "flow_encoder_chunk"
FLOW_ESTIMATOR = "flow_estimator"
FLOW_ESTIMATOR_CHUNK = "flow_estimator_chunk"
HIFT_F0 = "hift_f0"
HIFT_DECODER = "hift_decoder"

# name -> (input names, output names)
SIGNATURES: dict[str, tuple[list[str], list[str]]] = {
    FLOW_ENCODER: (["tokens", "token_lengths"], ["mu", "mel_lengths"]),
    FLOW_ENCODER_CHUNK: (
        ["tokens", "token_count", "lookahead_cache", "up_cache", "att_cache", "up_att_cache"],
        ["mu", "new_lookahead_cache", "new_up_cache", "new_att_cache", "new_up_att_cache"],
    ),
    FLOW_ESTIMATOR: (["x", "mask", "mu", "t", "spks", "cond"], ["velocity"]),
    FLOW_ESTIMATOR_CHUNK: (
        ["x", "mu", "t", "spks", "cond", "cnn_cache", "att_cache", "cache_lengths", "chunk_lengths"],
        ["velocity", "new_cnn_cache", "new_att_cache"],
    ),
    HIFT_F0: (["mel"], ["f0"]),
    HIFT_DECODER: (["mel", "source"], ["waveform"]),
}
GRAPHS = tuple(SIGNATURES)


class FlowEncoderGraph(nn.Module):
    """Offline flow encoder: the same `encode` the torch flow runs."""

    def __init__(self, flow: CausalMaskedDiffWithXvec) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor, token_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.encode_torch(tokens, token_lengths)


class FlowEncoderChunkGraph(nn.Module):
    """Streaming flow encoder: one chunk through the conformer caches (`FlowModel.encode_chunk`).

    tokens (B, t): the chunk's codes, whose last `pre_lookahead_len` are lookahead only; token_count (B,): how
    many are real, the rest (at the end of a stream) stand for the missing lookahead and are zeroed after the
    embedding, as the torch path pads zeros. Caches: lookahead_cache (B, d, 2), up_cache (B, d, 2*stride),
    att_cache (blocks, B, heads, T, 2*d_k), up_att_cache (up_blocks, B, heads, T', 2*d_k), length 0 at the
    first chunk. Rows of one call share cache lengths (the runtime calls it once per stream)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, tokens, token_count, lookahead_cache, up_cache, att_cache, up_att_cache):
        flow = self.flow
        x = flow.encoder.embed(flow.input_embedding(tokens))
        real = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < token_count.unsqueeze(1)
        x = x * real.unsqueeze(-1).to(x.dtype)
        h, *caches = flow.encoder.forward_chunk_embedded(x, lookahead_cache, up_cache, att_cache, up_att_cache)
        return (flow.encoder_proj(h).transpose(1, 2), *caches)


class EstimatorGraph(nn.Module):
    """`DiT.forward` (offline velocity) as a graph."""

    def __init__(self, estimator: DiT) -> None:
        super().__init__()
        self.estimator = estimator

    def forward(self, x, mask, mu, t, spks, cond) -> torch.Tensor:
        return self.estimator(x, mask, mu, t, spks, cond)


class HiFTF0Graph(nn.Module):
    def __init__(self, hift: HiFTGenerator) -> None:
        super().__init__()
        self.f0_predictor = hift.f0_predictor

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.f0_predictor(mel)


def _dft_bases(n_fft: int, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Analysis (real | imag rows) and synthesis bases for a one-sided DFT of size n_fft, window folded in.

    Computed in float64 so the bases are as exact as fp32 can hold them."""
    bins = n_fft // 2 + 1
    k = np.arange(bins)[:, None]
    n = np.arange(n_fft)[None, :]
    ang = 2 * math.pi * k * n / n_fft
    w = window.double().numpy()[None, :]
    analysis = np.concatenate([np.cos(ang) * w, -np.sin(ang) * w])  # X_k = sum_n x_n w_n e^{-i ang}
    # irfft: the DC and Nyquist bins count once, the others twice (Hermitian half); their imaginary parts
    # do not contribute (sin(ang) = 0 there), as in irfft.
    scale = np.full((bins, 1), 2.0)
    scale[0] = scale[-1] = 1.0
    synthesis = np.concatenate([scale * np.cos(ang) * w, -scale * np.sin(ang) * w]) / n_fft
    as_t = lambda a: torch.from_numpy(a.astype(np.float32)).unsqueeze(1)  # noqa: E731 - (2*bins, 1, n_fft)
    return as_t(analysis), as_t(synthesis)


class HiFTDecoderGraph(nn.Module):
    """`HiFTGenerator.decode` with the STFT as a strided conv and the iSTFT as a transposed conv + overlap-add
    normalisation (torch.stft / torch.istft with center=True, reflect padding, periodic Hann, one-sided)."""

    def __init__(self, hift: HiFTGenerator) -> None:
        super().__init__()
        self.hift = hift
        cfg = hift.cfg
        self.n_fft, self.hop = cfg.istft_n_fft, cfg.istft_hop
        analysis, synthesis = _dft_bases(self.n_fft, hift.stft_window)
        self.register_buffer("analysis", analysis, persistent=False)
        self.register_buffer("synthesis", synthesis, persistent=False)
        self.register_buffer("window_sq", hift.stft_window.pow(2).reshape(1, 1, -1), persistent=False)

    def stft(self, source: torch.Tensor) -> torch.Tensor:
        """(B, 1, L) -> (B, n_fft + 2, L / hop + 1): real parts then imaginary parts."""
        pad = self.n_fft // 2
        return F.conv1d(F.pad(source, (pad, pad), mode="reflect"), self.analysis, stride=self.hop)

    def istft(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        """One-sided spectrum (B, bins, F) -> (B, hop * (F - 1)) samples."""
        frames = real.shape[2]
        y = F.conv_transpose1d(torch.cat([real, imag], dim=1), self.synthesis, stride=self.hop)
        ones = torch.ones(1, 1, frames, dtype=real.dtype, device=real.device)
        envelope = F.conv_transpose1d(ones, self.window_sq, stride=self.hop)  # sum of squared windows
        start = self.n_fft // 2
        end = start + self.hop * (frames - 1)
        return (y[:, 0, start:end] / envelope[:, 0, start:end])

    def forward(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.hift.decode(mel, source, stft=self.stft, istft=self.istft)


def graph_modules(
    flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator
) -> dict[str, nn.Module]:
    """Every token2wav graph as an eval-mode module, keyed by graph name."""
    return {
        FLOW_ENCODER: FlowEncoderGraph(flow).eval(),
        FLOW_ENCODER_CHUNK: FlowEncoderChunkGraph(flow).eval(),
        FLOW_ESTIMATOR: EstimatorGraph(flow.decoder.estimator).eval(),
        FLOW_ESTIMATOR_CHUNK: EstimatorChunk(flow.decoder.estimator).eval(),
        HIFT_F0: HiFTF0Graph(hift).eval(),
        HIFT_DECODER: HiFTDecoderGraph(hift).eval(),
    }
