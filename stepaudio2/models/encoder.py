"""Whisper-style audio encoder and the adaptor (spec §1.3, §1.4).

Attribute names mirror the checkpoint keys (`encoder.*`, `adapter.*`) so loading is load_state_dict(strict=True).
Attention is written with explicit reshapes and scaled_dot_product_attention so the graph exports to ONNX with
dynamic batch and frame counts (ecosystem pitfall P2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.config import AudioEncoderConfig

# Additive bias on padded keys (spec §1.3); finite so fully padded rows stay NaN-free.
PAD_BIAS = -1e10


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # no key bias in Whisper
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        head_dim = d // self.n_head
        # Whisper scales q and k by head_dim^-0.25 each (product = 1/sqrt(head_dim)).
        scale = head_dim**-0.25
        q = (self.query(x) * scale).view(b, t, self.n_head, head_dim).transpose(1, 2)
        k = (self.key(x) * scale).view(b, t, self.n_head, head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.n_head, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=1.0)
        return self.out(y.to(x.dtype).transpose(1, 2).reshape(b, t, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), bias)
        return x + self.mlp(self.mlp_ln(x))


def encoder_output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Valid encoder frames (25 Hz) for valid mel frames: two stride-2 reductions (conv2, avg-pool)."""
    return torch.div(torch.div(mel_lengths + 1, 2, rounding_mode="floor"), 2, rounding_mode="floor")


def adaptor_output_lengths(encoder_lengths: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Valid adaptor frames (12.5 Hz): Conv1d kernel 3, padding 1, stride `stride`."""
    return torch.div(encoder_lengths - 1, stride, rounding_mode="floor") + 1


class AudioEncoder(nn.Module):
    """mel (B, n_mels, T) + valid lengths -> hidden states (B, T//4-ish, n_audio_state) at 25 Hz."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_audio_state, cfg.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(cfg.n_audio_ctx, cfg.n_audio_state)
        self.positional_embedding.requires_grad_(False)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.n_audio_state, cfg.n_audio_head) for _ in range(cfg.n_audio_layer)
        )
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(cfg.n_audio_state)

    def forward(
        self, mel: torch.Tensor, mel_lengths: torch.Tensor, mel_frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mel_frames` (B,): the padded frame count each item had in its own request's batch (upstream pads a
        request's chunks together). None = every item saw this batch's T, i.e. this call is one request.

        Upstream does not zero anything past the valid length: the adaptor's last row reads the encoder frame
        just past it when the encoder length is odd. To match that and still be batch invariant, every
        position at or past an item's own `mel_frames` is forced to what it would be in a batch of exactly that
        length (zeros where a conv pads), and the key mask is sampled with the item's own frame parity.
        """
        b, _, t_mel = mel.shape
        frames = torch.full((b,), t_mel, dtype=torch.long, device=mel.device) if mel_frames is None else mel_frames
        frames = frames.to(torch.long)
        mel_keep = torch.arange(t_mel, device=mel.device).unsqueeze(0) < frames.unsqueeze(1)  # (B, T)
        mel = mel * mel_keep.unsqueeze(1).to(mel.dtype)
        # conv2 reads one conv1 frame past an odd T: alone that frame is conv padding (zero), not gelu(bias).
        x = F.gelu(self.conv1(mel)) * mel_keep.unsqueeze(1).to(mel.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T2, D), 50 Hz
        t2 = x.shape[1]
        x = x + self.positional_embedding.weight[:t2].unsqueeze(0)
        # Key-padding mask at 50 Hz: the mel-rate mask sampled every 2nd frame from (T+1) % 2 (spec §1.3),
        # T being the item's own batch length.
        start = (frames + 1) % 2
        mel_pos = torch.arange(t2, device=mel.device).unsqueeze(0) * 2 + start.unsqueeze(1)
        valid = mel_pos < mel_lengths.unsqueeze(1)  # (B, T2)
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=mel.device)
        bias = bias.masked_fill(~valid, PAD_BIAS)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)  # 25 Hz
        # Rows past the item's own output length do not exist alone: the adaptor conv pads them with zeros.
        # Rows between the valid length and that are kept (upstream reads one of them).
        own_rows = torch.div(torch.div(frames + 1, 2, rounding_mode="floor"), 2, rounding_mode="floor")
        keep = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < own_rows.unsqueeze(1)
        return self.after_norm(x) * keep.unsqueeze(-1).to(x.dtype), encoder_output_lengths(mel_lengths)


class Adaptor(nn.Module):
    """Encoder states (25 Hz) -> LLM-width embeddings (12.5 Hz). `hidden` is 2048 in the real checkpoint
    (hard-coded upstream, not in config.json); the loader reads it from the stored tensor shapes."""

    def __init__(self, cfg: AudioEncoderConfig, hidden: int) -> None:
        super().__init__()
        self.stride = cfg.adapter_stride
        self.conv = nn.Conv1d(
            cfg.n_audio_state, cfg.n_audio_state, cfg.kernel_size, stride=cfg.adapter_stride,
            padding=(cfg.kernel_size - 1) // 2,
        )
        self.linear1 = nn.Linear(cfg.n_audio_state, hidden)
        self.linear2 = nn.Linear(hidden, cfg.llm_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.linear2(F.relu(self.linear1(x)))
        return x, adaptor_output_lengths(lengths, self.stride)
