"""ONNX graphs of the LLM side: audio encoder + adaptor, and the Qwen2 decoder with a KV cache.

Both wrap the core torch modules (one source of truth for the math) and are exported with the dynamo
exporter and explicit dynamic dimensions (ecosystem P2/P3: traced with batch >= 2 and past >= 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from stepaudio2.models.graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    AudioEncoderGraph,
    DecoderGraph,
)
from stepaudio2.models.step_audio2 import StepAudio2ForCausalLM

OPSET = 18
MAX_BATCH = 64
MAX_FRAMES = 3000  # 1500 encoder positions x 2 (spec §1.3)
MAX_SEQ = 16384



def encoder_example(model: StepAudio2ForCausalLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_mels = model.cfg.audio.n_mels
    return torch.randn(2, n_mels, 300), torch.tensor([298, 150]), torch.tensor([300, 152])


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
    batch, frames = Dim("batch", min=1, max=MAX_BATCH), Dim("frames", min=3, max=MAX_FRAMES)
    torch.onnx.export(
        AudioEncoderGraph(model).eval(),
        encoder_example(model),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=ENCODER_INPUTS,
        output_names=ENCODER_OUTPUTS,
        dynamic_shapes={"mel": {0: batch, 2: frames}, "mel_lengths": {0: batch}, "mel_frames": {0: batch}},
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
