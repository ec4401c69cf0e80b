"""ONNX graphs of the LLM side: audio encoder + adaptor, and the Qwen2 decoder with a KV cache.

Both wrap the core torch modules (one source of truth for the math) and are exported with the dynamo
exporter and explicit dynamic dimensions (ecosystem P2/P3: traced with batch >= 2 and past >= 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from stepaudio2.models.step_audio2 import StepAudio2ForCausalLM

OPSET = 18
MAX_BATCH = 64
MAX_FRAMES = 3000  # 1500 encoder positions x 2 (spec §1.3)
MAX_SEQ = 16384

ENCODER_INPUTS = ["mel", "mel_lengths"]
ENCODER_OUTPUTS = ["audio_embeds", "embed_lengths"]
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids", "past_keys", "past_values"]
DECODER_OUTPUTS = ["logits", "present_keys", "present_values"]


class AudioEncoderGraph(nn.Module):
    """mel (B, n_mels, T) float, mel_lengths (B,) int64 -> audio_embeds (B, N, H), embed_lengths (B,)."""

    def __init__(self, model: StepAudio2ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_audio(mel, mel_lengths)


class DecoderGraph(nn.Module):
    """One prefill or decode step over a ragged batch.

    inputs_embeds (B, S, H); attention_mask (B, P+S) int64 (1 = real token, 0 = left padding); position_ids
    (B, S); past_keys / past_values (L, B, KV, P, D). Returns logits (B, S, V) and present keys/values
    (L, B, KV, P+S, D). Stacking the layers into one tensor keeps the graph's signature independent of depth.
    """

    def __init__(self, model: StepAudio2ForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.cfg.text.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past_keys, past_values):
        cache = self.model.new_cache()
        for i in range(self.num_layers):
            cache.update(past_keys[i], past_values[i], i)
        logits, cache = self.model(inputs_embeds, position_ids, cache=cache, attention_mask=attention_mask)
        keys = torch.stack([cache.layers[i].keys for i in range(self.num_layers)])
        values = torch.stack([cache.layers[i].values for i in range(self.num_layers)])
        return logits, keys, values


def encoder_example(model: StepAudio2ForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    n_mels = model.cfg.audio.n_mels
    return torch.randn(2, n_mels, 300), torch.tensor([298, 150])


def decoder_example(model: StepAudio2ForCausalLM, batch: int = 2, seq: int = 3, past: int = 4):
    t = model.cfg.text
    shape = (t.num_hidden_layers, batch, t.num_key_value_heads, past, t.head_dim)
    return (
        torch.randn(batch, seq, t.hidden_size),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        torch.randn(shape),
        torch.randn(shape),
    )


def export_audio_encoder(model: StepAudio2ForCausalLM, path: Path) -> None:
    batch, frames = Dim("batch", min=1, max=MAX_BATCH), Dim("frames", min=8, max=MAX_FRAMES)
    torch.onnx.export(
        AudioEncoderGraph(model).eval(),
        encoder_example(model),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=ENCODER_INPUTS,
        output_names=ENCODER_OUTPUTS,
        dynamic_shapes={"mel": {0: batch, 2: frames}, "mel_lengths": {0: batch}},
        verbose=False,
    )


def export_decoder(model: StepAudio2ForCausalLM, path: Path) -> None:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq, past, total = Dim("seq", min=1, max=MAX_SEQ), Dim("past", min=0, max=MAX_SEQ), Dim("total", min=1, max=MAX_SEQ)
    torch.onnx.export(
        DecoderGraph(model).eval(),
        decoder_example(model),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_shapes={
            "inputs_embeds": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past_keys": {1: batch, 3: past},
            "past_values": {1: batch, 3: past},
        },
        verbose=False,
    )
