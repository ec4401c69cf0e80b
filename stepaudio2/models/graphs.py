"""Graph-shaped wrappers of the core modules: the exact signatures that are exported to ONNX/TensorRT.

The runtime can run these same wrappers in torch (TorchGraphRunner), so every engine sees one signature.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stepaudio2.models.step_audio2 import StepAudio2ForCausalLM

ENCODER_INPUTS = ["mel", "mel_lengths", "mel_frames"]
ENCODER_OUTPUTS = ["audio_embeds", "embed_lengths"]
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids", "past_keys", "past_values"]
DECODER_OUTPUTS = ["logits", "present_keys", "present_values"]


class AudioEncoderGraph(nn.Module):
    """mel (B, n_mels, T) float, mel_lengths (B,) int64, mel_frames (B,) int64 (each item's own request batch
    length, <= T) -> audio_embeds (B, N, H), embed_lengths (B,)."""

    def __init__(self, model: StepAudio2ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, mel: torch.Tensor, mel_lengths: torch.Tensor, mel_frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_audio(mel, mel_lengths, mel_frames)


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


class TorchGraphRunner:
    """Runner interface (named numpy in, named numpy out) over a graph wrapper, run in torch."""

    def __init__(self, graph: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        self.graph = graph.eval()
        self.input_names = input_names
        self.output_names = output_names

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.graph(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        return {n: o.numpy() for n, o in zip(self.output_names, outs, strict=True)}
