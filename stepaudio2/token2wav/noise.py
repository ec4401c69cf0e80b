"""The flow's fixed start noise, drawn as upstream draws it.

Upstream builds the flow from `flow.yaml` with HyperPyYAML: the file first calls `torch.manual_seed(1986)`, then
constructs the conformer encoder (every layer's default initialisation draws from torch's global generator),
then the DiT estimator (default initialisation, then its own `initialize_weights`: Xavier-uniform on every
Linear, N(0, 0.02) on the two timestep-MLP weights), and only then the CFM, whose constructor draws the noise
buffer with `torch.randn`. The buffer therefore depends on the model's dimensions. `upstream_noise_buffer`
replays exactly those draws (same ops, same sizes, same order) on a private copy of the global generator's
state, so the process's own RNG is left alone, and returns the buffer; no weights are materialised.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from stepaudio2.token2wav.config import FlowConfig

NOISE_SEED = 1986  # flow.yaml's torch.manual_seed
MEL_FRAME_RATE = 50
NOISE_SECONDS = 600  # the buffer covers this much mel: (1, mel, 50 * 600)

_DEFAULT_INIT = (nn.Linear, nn.Conv1d)  # reset_parameters: kaiming-uniform weight, uniform bias


def _draw_default_init(module: nn.Module) -> None:
    """Consume the global generator as constructing `module` does: children first (they are built before the
    parent's own parameters), LayerNorms draw nothing, Embeddings draw N(0, 1), the remaining own parameters of
    a module (the conformer's pos_bias_u / pos_bias_v) are Xavier-uniform."""
    if isinstance(module, nn.LayerNorm):
        return
    if isinstance(module, _DEFAULT_INIT):
        torch.empty(module.weight.shape).uniform_()
        if module.bias is not None:
            torch.empty(module.bias.shape).uniform_()
        return
    if isinstance(module, nn.Embedding):
        torch.empty(module.weight.shape).normal_()
        return
    for child in module.children():
        _draw_default_init(child)
    for p in module.parameters(recurse=False):
        torch.empty(p.shape).uniform_()


def _draw_dit_initialize_weights(dit: nn.Module) -> None:
    """Upstream DiT.initialize_weights: Xavier-uniform on every Linear weight (module order; biases and the
    zeroed adaLN / output layers draw nothing), then normal_ on the timestep MLP's two Linear weights."""
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            torch.empty(m.weight.shape).uniform_()
    for layer in (dit.t_embedder.mlp[0], dit.t_embedder.mlp[2]):
        torch.empty(layer.weight.shape).normal_()


@lru_cache(maxsize=4)
def upstream_noise_buffer(cfg: FlowConfig) -> torch.Tensor:
    """(1, mel_bins, 30000) float32: the x0 buffer upstream's flow holds for these dimensions."""
    from stepaudio2.token2wav.conformer import UpsampleConformerEncoderV2
    from stepaudio2.token2wav.dit import DiT

    # Shapes only: meta tensors cost nothing and their default init draws nothing.
    with torch.device("meta"):
        encoder = UpsampleConformerEncoderV2(cfg.encoder)
        dit = DiT(cfg.decoder.estimator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NOISE_SEED)
        _draw_default_init(encoder)
        _draw_default_init(dit)
        _draw_dit_initialize_weights(dit)
        return torch.randn(1, cfg.decoder.estimator.out_channels, MEL_FRAME_RATE * NOISE_SECONDS)
