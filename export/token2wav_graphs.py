"""ONNX graphs of token2wav: flow encoder, DiT estimator (offline and streaming chunk), HiFT F0 + decoder.

The wrappers (stepaudio2.token2wav.graphs) call the core torch modules, so the math has one source. Exported
with the dynamo exporter and explicit dynamic dimensions, traced with batch >= 2 and lengths >= 2 (ecosystem
P2/P3). HiFT's seeded source module is not exported: it stays in the runtime between `hift_f0` and
`hift_decoder` (see stepaudio2.token2wav.graphs).

Limits (spec §4): offline flow up to 600 s (15000 codes, 30000 mel frames, the noise buffer); voice prompts up
to 30 s (1500 mel frames), so a streaming chunk is at most 1500 frames (the prompt at stream setup) and the
estimator cache at most the prompt plus 100 frames before the chunk is appended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.export import Dim

from stepaudio2.token2wav.flow import (
    CONFORMER_CACHE_KEEP_TOKENS,
    ESTIMATOR_CACHE_KEEP_FRAMES,
    CausalMaskedDiffWithXvec,
)
from stepaudio2.token2wav.graphs import (
    FLOW_ENCODER,
    FLOW_ENCODER_CHUNK,
    FLOW_ESTIMATOR,
    FLOW_ESTIMATOR_CHUNK,
    HIFT_DECODER,
    HIFT_F0,
    SIGNATURES,
    graph_modules,
)
from stepaudio2.token2wav.hift import HiFTGenerator

OPSET = 18
MAX_BATCH = 64  # requests (streams) per call; the estimators see twice as many rows (CFG)
MAX_TOKENS = 15000  # 600 s of codes at 25 Hz
MAX_FRAMES = 30000  # 600 s of mel at 50 Hz (the flow's noise buffer)
MAX_PROMPT_FRAMES = 1500  # 30 s voice prompt
MAX_CHUNK_FRAMES = MAX_PROMPT_FRAMES  # stream setup runs the whole prompt as one chunk
MAX_CACHE_FRAMES = MAX_PROMPT_FRAMES + ESTIMATOR_CACHE_KEEP_FRAMES
MAX_PROMPT_TOKENS = MAX_PROMPT_FRAMES // 2
# Streaming conformer: chunks up to the prompt plus its stand-in lookahead (stream setup); caches keep the
# prompt plus the most recent tokens (x2 for the upsampled blocks).
MAX_CHUNK_TOKENS = MAX_PROMPT_TOKENS + 3
MAX_CONFORMER_CACHE = MAX_PROMPT_TOKENS + CONFORMER_CACHE_KEEP_TOKENS


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def examples(flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator) -> dict[str, tuple[torch.Tensor, ...]]:
    """Trace inputs per graph: batch >= 2, ragged lengths >= 2 (P3)."""
    g = torch.Generator().manual_seed(0)
    mel, est = flow.mel_bins, flow.decoder.estimator
    depth, heads, width = len(est.blocks), est.cfg.num_heads, est.att_cache_width
    b, t = 4, 23
    enc = flow.cfg.encoder
    d_k = enc.output_size // enc.attention_heads
    return {
        FLOW_ENCODER: (torch.randint(0, flow.cfg.vocab_size, (2, 17), generator=g), torch.tensor([17, 9])),
        FLOW_ENCODER_CHUNK: (
            torch.randint(0, flow.cfg.vocab_size, (2, 9), generator=g), torch.tensor([9, 6]),
            _randn(g, 2, enc.output_size, 2), _randn(g, 2, enc.output_size, 2 * enc.up_stride),
            _randn(g, enc.num_blocks, 2, enc.attention_heads, 5, 2 * d_k),
            _randn(g, enc.num_up_blocks, 2, enc.attention_heads, 10, 2 * d_k),
        ),
        FLOW_ESTIMATOR: (
            _randn(g, b, mel, t), (torch.arange(t) < torch.tensor([[23], [11], [23], [11]])).float().unsqueeze(1),
            _randn(g, b, mel, t), torch.rand(b, generator=g), _randn(g, b, mel), _randn(g, b, mel, t),
        ),
        FLOW_ESTIMATOR_CHUNK: (
            _randn(g, b, mel, 13), _randn(g, b, mel, 13), torch.rand(b, generator=g), _randn(g, b, mel),
            torch.zeros(b, mel, 13), _randn(g, depth, b, est.cnn_cache_channels, est.cnn_cache_len),
            _randn(g, depth, b, heads, 20, width), torch.tensor([20, 7, 20, 7]), torch.tensor([13, 5, 13, 5]),
        ),
        HIFT_F0: (_randn(g, 2, hift.cfg.in_channels, 9),),
        HIFT_DECODER: (_randn(g, 2, hift.cfg.in_channels, 9), 0.1 * _randn(g, 2, 1, 9 * hift.hop_length)),
    }


def dynamic_shapes(hop: int) -> dict[str, dict[str, dict[int, Dim]]]:
    """Dynamic dimensions per graph and input (named as the ONNX inputs)."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    rows = Dim("rows", min=1, max=2 * MAX_BATCH)  # CFG-doubled batch
    tokens = Dim("tokens", min=2, max=MAX_TOKENS)  # prompt + codes: at least 2
    frames = Dim("frames", min=1, max=MAX_FRAMES)
    chunk = Dim("chunk", min=1, max=MAX_CHUNK_FRAMES)
    chunk_tokens = Dim("chunk_tokens", min=4, max=MAX_CHUNK_TOKENS)  # > the 3 lookahead codes
    conf_cache = Dim("conf_cache", min=0, max=MAX_CONFORMER_CACHE)
    up_conf_cache = Dim("up_conf_cache", min=0, max=2 * MAX_CONFORMER_CACHE)
    prev = Dim("prev", min=0, max=MAX_CACHE_FRAMES)
    mel_frames = Dim("mel_frames", min=1, max=MAX_FRAMES)
    seq3 = {0: rows, 2: frames}
    chunk3 = {0: rows, 2: chunk}
    return {
        FLOW_ENCODER: {"tokens": {0: batch, 1: tokens}, "token_lengths": {0: batch}},
        FLOW_ENCODER_CHUNK: {
            "tokens": {0: batch, 1: chunk_tokens}, "token_count": {0: batch}, "lookahead_cache": {0: batch},
            "up_cache": {0: batch}, "att_cache": {1: batch, 3: conf_cache}, "up_att_cache": {1: batch, 3: up_conf_cache},
        },
        FLOW_ESTIMATOR: {"x": seq3, "mask": seq3, "mu": seq3, "t": {0: rows}, "spks": {0: rows}, "cond": seq3},
        FLOW_ESTIMATOR_CHUNK: {
            "x": chunk3, "mu": chunk3, "t": {0: rows}, "spks": {0: rows}, "cond": chunk3,
            "cnn_cache": {1: rows}, "att_cache": {1: rows, 3: prev}, "cache_lengths": {0: rows},
            "chunk_lengths": {0: rows},
        },
        HIFT_F0: {"mel": {0: batch, 2: mel_frames}},
        HIFT_DECODER: {"mel": {0: batch, 2: mel_frames}, "source": {0: batch, 2: hop * mel_frames}},
    }


def export_token2wav_graphs(
    flow: CausalMaskedDiffWithXvec,
    hift: HiFTGenerator,
    out_dir: Path,
    log: Callable[[str, float], None] | None = None,
) -> dict[str, Path]:
    """Write `<out_dir>/<graph>.onnx` for every token2wav graph; returns {graph: path}."""
    modules = graph_modules(flow, hift)
    ex, shapes = examples(flow, hift), dynamic_shapes(hift.hop_length)
    paths = {}
    for name, module in modules.items():
        t0 = time.perf_counter()
        inputs, outputs = SIGNATURES[name]
        paths[name] = out_dir / f"{name}.onnx"
        torch.onnx.export(
            module, ex[name], str(paths[name]), dynamo=True, opset_version=OPSET, input_names=inputs,
            output_names=outputs, dynamic_shapes=shapes[name], verbose=False,
        )
        if log is not None:
            log(name, time.perf_counter() - t0)
    return paths
